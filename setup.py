"""Build ``moe_comm._C`` from csrc/ with nvcc + pybind11 when nvcc is found; otherwise install pure Python.
With it comes ``moe_comm._C_simt``: the same kernels compiled by the host C++ compiler to run on CPU fibers
(csrc/simt/simt.h), which the tests' kernel model runs where there is no GPU.
Independently of nvcc, ``moe_comm._cpu`` (csrc/cpu/: the portable backend's CPU kernels) is built
by the host C++ compiler when there is one; without it the backend uses its pure-PyTorch path.

Environment:
    MOE_COMM_CUDA_ARCHS: semicolon/comma separated SM versions (default "90" -> sm_90).
    MAX_JOBS: at most this many nvcc processes at once (default: one per core).
    MOE_COMM_SKIP_CUDA=1: skip the extension even when nvcc exists (and tolerate a failing build).
    MOE_COMM_SKIP_SIMT=1: build moe_comm._C but not moe_comm._C_simt (whose tests then skip).
    MOE_COMM_SIMT_SANITIZE=address: build moe_comm._C_simt with AddressSanitizer (scripts/simt_asan.sh);
        =thread: with ThreadSanitizer, each CUDA thread a TSan fiber (scripts/simt_tsan.sh).
    MOE_COMM_SKIP_CPU=1: do not build moe_comm._cpu.
    CXX: the host C++ compiler (default: c++ or g++ on PATH).
    CUDA_HOME / CUDA_PATH: where CUDA lives (else found from nvcc on PATH).
A present nvcc whose compilation fails FAILS the install, so broken CUDA code is caught in CI.
The CUDA runtime is linked statically, so importing on a CPU-only machine works. torch is not needed here.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    return None


def _cuda_host_paths(nvcc: str) -> tuple[list[str], list[str]]:
    """The include and library directories nvcc itself uses (so wrapper scripts and split installs work), as
    host-compiler flags."""
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True, check=False).stderr
    includes: list[str] = []
    libs: list[str] = []
    for line in dry.splitlines():
        words = line.replace('"', " ").split()
        for i, word in enumerate(words):
            if word.startswith("-I") and len(word) > 2:
                includes.append(word)
            elif word == "-isystem" and i + 1 < len(words):
                includes.append(f"-I{words[i + 1]}")
            elif word.startswith("-L") and len(word) > 2 and not word.rstrip("/").endswith("stubs"):
                libs.append(word)
    return list(dict.fromkeys(includes)), list(dict.fromkeys(libs))


def _archs() -> list[str]:
    raw = os.environ.get("MOE_COMM_CUDA_ARCHS", "90")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise SystemExit(f"MOE_COMM_CUDA_ARCHS: bad architecture {a!r} (expected e.g. 90 or 90a)")
    return archs


def _host_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _accepted_flags(cxx: str, flags: list[str]) -> list[str]:
    """The ``flags`` that ``cxx`` accepts (it compiles an empty program with each): GCC's tuning flags drop out
    on compilers that lack them."""
    accepted = []
    for flag in flags:
        probe = subprocess.run([cxx, "-x", "c++", "-c", "-o", os.devnull, "-Werror", flag, "-"], input=b"",
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if probe.returncode == 0:
            accepted.append(flag)
    return accepted


def _object_path(build_tmp: Path, src: str) -> Path:
    """Where the object of source ``src`` goes (``kernels/layout.cu`` -> ``layout_cu.o``)."""
    return build_tmp / (Path(src).stem + Path(src).suffix.replace(".", "_") + ".o")


def _run_parallel(commands: list[list[str]]) -> None:
    """Run the compile commands, as many at once as there are cores (MAX_JOBS caps it, as for torch extensions)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = int(os.environ.get("MAX_JOBS") or cores)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, len(commands)))) as pool:
        for cmd in commands:
            print(" ".join(cmd), flush=True)
        failed = [cmd for cmd, rc in zip(commands, pool.map(subprocess.call, commands), strict=True) if rc != 0]
    if failed:
        raise subprocess.CalledProcessError(1, [next(a for a in cmd if a.endswith((".cu", ".cpp"))) for cmd in failed])


class MoeCommBuildExt(build_ext):
    """``moe_comm._C``: compile .cu with nvcc, .cpp with nvcc as host compiler driver, link with nvcc (static
    cudart). ``moe_comm._C_simt``: the same sources with the host C++ compiler and -DMOE_COMM_SIMT, the kernels
    running on CPU fibers (csrc/simt/simt.h), for the tests' kernel model. ``moe_comm._cpu``: csrc/cpu/ with
    the host C++ compiler."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name.endswith("_C_simt"):
            self._build_simt(ext)
            return
        if ext.name.endswith("_cpu"):
            self._build_cpu(ext)
            return
        import pybind11

        cuda = _cuda_home()
        nvcc = str(cuda / "bin" / "nvcc")
        archs = _archs()
        gencode: list[str] = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC / 'include'}"]
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                  f"-DMOE_COMM_ARCHS=\"{';'.join('sm_' + a for a in archs)}\""]
        build_tmp = Path(self.build_temp) / "moe_comm_C"
        build_tmp.mkdir(parents=True, exist_ok=True)
        commands, objects = [], []
        for src in ext.sources:
            obj = _object_path(build_tmp, src)
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *common, *includes]
            if src.endswith(".cu"):
                cmd += [*gencode, "--expt-relaxed-constexpr", "-lineinfo"]
            else:
                cmd += ["-x", "c++"]
            commands.append(cmd)
            objects.append(str(obj))
        _run_parallel(commands)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-o", str(out), *objects, *gencode, "-cudart", "static",
                f"-L{cuda / 'lib64'}", "-lrt", "-lpthread", "-ldl"]
        print(" ".join(link), flush=True)
        subprocess.check_call(link)

    def _build_simt(self, ext: Extension) -> None:
        import pybind11

        cuda_includes, cuda_libs = _cuda_host_paths(str(_cuda_home() / "bin" / "nvcc"))
        cxx = _host_cxx()
        if cxx is None:
            raise SystemExit("moe_comm: no host C++ compiler for moe_comm._C_simt (set CXX)")
        # -fno-strict-aliasing: the kernels reinterpret 16-byte vectors as rows, which nvcc allows.
        # -mfma -ffp-contract=fast: contract a * b + c into an FMA where the host compiler sees one, as nvcc does.
        fma = ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []  # FMA is baseline on arm64
        flags = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", *fma,
                 "-ffp-contract=fast", "-Wno-unknown-pragmas", "-DMOE_COMM_SIMT",
                 f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC / 'include'}",
                 *cuda_includes]
        sanitize = os.environ.get("MOE_COMM_SIMT_SANITIZE", "")
        source_flags = {}
        if sanitize:
            flags = [f if f != "-O2" else "-O1" for f in flags] + ["-fno-omit-frame-pointer", "-g"]
            if sanitize == "thread":
                # The fiber scheduler stays uninstrumented and tells ThreadSanitizer what CUDA orders (simt.cpp).
                flags += ["-DMOE_COMM_SIMT_TSAN=1", "-Wno-tsan"]  # fences: the atomics after them are seq_cst
                source_flags[str((CSRC / "simt" / "simt.cpp").relative_to(ROOT))] = list(flags)
            flags.append(f"-fsanitize={sanitize}")
        self._build_host(ext, cxx, flags, [*cuda_libs, "-l:libcudart_static.a", "-lrt", "-lpthread", "-ldl",
                                           *([f"-fsanitize={sanitize}"] if sanitize else [])], source_flags)

    def _build_host(self, ext: Extension, cxx: str, flags: list[str], link_args: list[str],
                    source_flags: dict[str, list[str]] | None = None) -> None:
        """Compile ``ext``'s sources as C++ with ``cxx`` and ``flags`` (in parallel; a source in ``source_flags``
        with its own), link them with ``link_args``."""
        build_tmp = Path(self.build_temp) / ext.name.replace(".", "_")
        build_tmp.mkdir(parents=True, exist_ok=True)
        objects = [str(_object_path(build_tmp, src)) for src in ext.sources]
        flags_of = source_flags or {}
        _run_parallel([[cxx, "-c", "-x", "c++", str(src), "-o", obj, *flags_of.get(str(src), flags)]
                       for src, obj in zip(ext.sources, objects, strict=True)])
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [cxx, "-shared", "-o", str(out), *objects, *link_args]
        print(" ".join(link), flush=True)
        subprocess.check_call(link)

    def _build_cpu(self, ext: Extension) -> None:
        """``moe_comm._cpu``: plain host C++; skipped (the backend falls back) when there is no compiler, but a
        compiler that fails on it fails the build."""
        cxx = _host_cxx()
        if cxx is None:
            print("moe_comm: no host C++ compiler, skipping moe_comm._cpu (pure-PyTorch code on CPU ranks)", file=sys.stderr)
            return
        import pybind11

        # -ffp-contract=off: the sums must be exactly the reference's adds (there is nothing to fuse, but no
        # compiler default may change that). The other two only let the loops vectorise (docs/
        # portable-cpu-performance.md): -fno-loop-unroll-and-jam keeps the adds over a bag's rows from being
        # jammed into scalar code; -fno-trapping-math lets the fp16 conversion's float work be if-converted.
        flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
                 *_accepted_flags(cxx, ["-fno-loop-unroll-and-jam", "-fno-trapping-math"]),
                 f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        self._build_host(ext, cxx, flags, ["-lpthread"])


def _extensions() -> tuple[list[Extension], dict]:
    cpu = str((CSRC / "cpu").relative_to(ROOT))
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))
    extensions = []
    if os.environ.get("MOE_COMM_SKIP_CPU") != "1":
        extensions.append(Extension("moe_comm._cpu", sources=[src for src in sources if src.startswith(cpu)]))
    if os.environ.get("MOE_COMM_SKIP_CUDA") == "1":
        print("moe_comm: MOE_COMM_SKIP_CUDA=1, no CUDA extension", file=sys.stderr)
    elif _cuda_home() is None:
        print("moe_comm: nvcc not found, no CUDA extension (portable torch backend only)", file=sys.stderr)
    else:
        simt = str((CSRC / "simt").relative_to(ROOT))
        kernels = [src for src in sources if not src.startswith(cpu)]
        extensions.append(Extension("moe_comm._C", sources=[src for src in kernels if not src.startswith(simt)]))
        if os.environ.get("MOE_COMM_SKIP_SIMT") != "1":
            extensions.append(Extension("moe_comm._C_simt", sources=kernels))
    return extensions, ({"build_ext": MoeCommBuildExt} if extensions else {})


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
