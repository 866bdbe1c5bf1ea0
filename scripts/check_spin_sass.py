#!/usr/bin/env python3
"""Check the compiled kernels' spin loops for L1 invalidates.

On sm_90 an acquire load (``ld.acquire``) and a fence compile to their load or barrier followed by
``CCTL.IVALL``, which invalidates the SM's whole L1. Inside a spin loop that would run once per iteration
and evict the lines of every warp on the SM, so the kernels spin on relaxed loads and take one acquire load
after the flag arrives (``spin_until_reached`` in csrc/include/ptx.cuh). This script reads the SASS of the
built extension (``cuobjdump -sass``) and fails if a spin loop holds an invalidate again.

A spin loop here is a backward branch whose body is at most ``MAX_SPIN_INSTRUCTIONS`` instructions and
holds a system-scope strong load (``LDG.E.STRONG.SYS``, what ``ld.relaxed.sys``/``ld.acquire.sys``
become). Loops over tokens or peers are longer and may hold one acquire per wait; they are not spins.

Usage: scripts/check_spin_sass.py [path/to/_C.so]   (prints one line per spin loop; finds cuobjdump with tools_dir)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_SPIN_INSTRUCTIONS = 40

_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:!?U?P[T\d],\s*)?`?\(?(0x[0-9a-f]+)")


@dataclass(frozen=True)
class SpinLoop:
    """One backward branch's body: `function` (mangled name), addresses `start`..`end` (inclusive)."""

    function: str
    start: int
    end: int
    instructions: int
    invalidates_l1: bool


def spin_loops(sass: str, max_instructions: int = MAX_SPIN_INSTRUCTIONS) -> list[SpinLoop]:
    """The spin loops in `sass` (text of ``cuobjdump -sass``), in the order their branches appear."""
    marks = list(_FUNCTION.finditer(sass))
    loops = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        body = sass[mark.end() : following.start() if following else len(sass)]
        code = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(body)]
        for address, text in code:
            branch = _BRANCH.search(text)
            if branch is None or int(branch.group(1), 16) > address:
                continue
            start = int(branch.group(1), 16)
            loop = [t for a, t in code if start <= a <= address]
            if len(loop) <= max_instructions and any(t.startswith("LDG") and "STRONG.SYS" in t for t in loop):
                loops.append(SpinLoop(mark.group(1), start, address, len(loop), any("CCTL.IVALL" in t for t in loop)))
    return loops


def tools_dir() -> str | None:
    """The folder holding ``cuobjdump`` and ``nvdisasm``: on PATH, else the nvidia-cuda-cuobjdump and
    nvidia-cuda-nvdisasm wheels' (the ``test`` extra installs them), else None."""
    if shutil.which("cuobjdump") and shutil.which("nvdisasm"):
        return str(Path(shutil.which("cuobjdump")).parent)
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for found in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            if (found.parent / "nvdisasm").exists():
                return str(found.parent)
    return None


def sass_of(library: Path) -> str:
    """``cuobjdump -sass`` of `library`. Raises RuntimeError without the tools, or when cuobjdump prints no
    SASS (it does so silently when nvdisasm is missing)."""
    folder = tools_dir()
    if folder is None:
        raise RuntimeError("cuobjdump and nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = {**os.environ, "PATH": folder + os.pathsep + os.environ.get("PATH", "")}
    sass = subprocess.run([str(Path(folder) / "cuobjdump"), "-sass", str(library)], check=True, capture_output=True,
                          text=True, env=env).stdout
    if not _FUNCTION.search(sass):
        raise RuntimeError(f"cuobjdump printed no SASS for {library}")
    return sass


def default_library() -> Path:
    import moe_comm._C as ext

    return Path(ext.__file__)


def main(argv: list[str]) -> int:
    library = Path(argv[1]) if len(argv) > 1 else default_library()
    loops = spin_loops(sass_of(library))
    for loop in loops:
        verdict = "INVALIDATES L1" if loop.invalidates_l1 else "ok"
        print(f"{verdict:>14}  {loop.instructions:3d} instructions  {loop.start:#x}..{loop.end:#x}  {loop.function}")
    bad = sum(loop.invalidates_l1 for loop in loops)
    print(f"{len(loops)} spin loops, {bad} with CCTL.IVALL inside")
    return 1 if bad or not loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
