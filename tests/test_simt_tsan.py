"""The ThreadSanitizer build of ``moe_comm._C_simt`` (scripts/simt_tsan.sh): it reports races between the CUDA
threads of a block and between blocks that no thread or block order shows, and nothing where barriers, atomics
or the launch order the accesses. Skipped unless
``$MOE_COMM_SIMT_MODULE`` is such a build; each kernel runs in a child process, which TSan reports into."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cuda_model.simt import simt_built, simt_module

if not simt_built() or not getattr(simt_module(), "SIMT_THREAD_SANITIZER", False):
    pytest.skip("not a ThreadSanitizer build of moe_comm._C_simt (scripts/simt_tsan.sh makes one)", allow_module_level=True)

RACE = "WARNING: ThreadSanitizer: data race"


def tsan_reports(kernel: str, tmp_path: Path) -> str:
    """Run selftest `kernel` twice (launches of 2 blocks of 64 threads) in a child process; what TSan reported
    there."""
    code = ("from tests.cuda_model.simt import simt_module\n"
            "for _ in range(2):\n"
            f"    error, _ = simt_module().simt_selftest({kernel!r}, 2, 64)\n"
            "    assert error == '', error\n")
    env = {**os.environ, "TSAN_OPTIONS": f"halt_on_error=0 exitcode=0 report_signal_unsafe=0 log_path={tmp_path / 'tsan'}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return "".join(p.read_text() for p in sorted(tmp_path.glob("tsan*")))


@pytest.mark.parametrize("kernel", ["shared_without_barrier", "shared_overwritten_without_barrier"])
def test_race_between_threads_of_a_block_is_reported_at_its_line(kernel, tmp_path):
    reports = tsan_reports(kernel, tmp_path)
    assert RACE in reports and "selftest.cpp:" in reports, reports[-3000:]
    assert "CUDA thread " in reports, "the report names the fibers as CUDA threads"


def test_race_between_blocks_is_reported_naming_both(tmp_path):
    reports = tsan_reports("blocks_store_one_word", tmp_path)
    assert RACE in reports and "selftest.cpp:" in reports, reports[-3000:]
    assert "CUDA thread 0 of block 0" in reports and "CUDA thread 0 of block 1" in reports, reports[-3000:]


@pytest.mark.parametrize("kernel", ["shared_with_barrier", "shared_overwritten_with_barrier", "collectives",
                                    "barrier_and", "block_order", "shared_uninitialised", "blocks_sum_then_last_adds"])
def test_accesses_that_cuda_orders_are_not_reported(kernel, tmp_path):
    reports = tsan_reports(kernel, tmp_path)
    assert RACE not in reports, reports[-3000:]
