"""The portable backend's conformance checks (tests/conformance.py) against ``backend="cuda"``.

Ranks are separate processes sharing the one GPU (gloo for the host-side exchanges, CUDA IPC between the
processes' symmetric buffers): the real multi-process code path, time-sliced by the driver. Skipped without
a GPU or the extension.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from moe_comm.backends import cuda as cb  # noqa: E402

if not cb.extension_status()[0]:
    pytest.skip(f"cuda extension unusable: {cb.extension_status()[1]}", allow_module_level=True)

from tests import conformance as C  # noqa: E402
from tests.harness import pool_fixture  # noqa: E402

pool = pool_fixture(2, 4, timeout_s=180.0)
BACKEND = "cuda"


@pytest.mark.parametrize("routing", C.ROUTINGS)
def test_layout(pool, routing):
    pool.run(C.check_layout, BACKEND, C.Case(routing=routing, seed=1))


@pytest.mark.parametrize("routing", C.ROUTINGS)
def test_dispatch_combine(pool, routing):
    pool.run(C.check_dispatch_combine, BACKEND, C.Case(routing=routing, seed=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dispatch_combine_dtypes(pool, dtype):
    pool.run(C.check_dispatch_combine, BACKEND, C.Case(seed=3, dtype=dtype), given_layout=True)


def test_combine_is_x_times_ranks_reached(pool):
    pool.run(C.check_combine_exact, BACKEND, C.Case(routing="masked", seed=4))


def test_expert_alignment_and_async(pool):
    pool.run(C.check_dispatch_combine, BACKEND, C.Case(seed=5), expert_alignment=8, async_finish=True)


def test_fp8_dispatch_bit_exact(pool):
    pool.run(C.check_fp8_dispatch, BACKEND, C.Case(seed=6, hidden=256))


def test_cached_dispatch(pool):
    pool.run(C.check_cached_dispatch, BACKEND, C.Case(routing="zipf", seed=7))


@pytest.mark.parametrize("routing", ["uniform", "empty_rank"])
def test_num_worst_tokens(pool, routing):
    pool.run(C.check_worst_tokens, BACKEND, C.Case(routing=routing, seed=8))


def test_repeated_runs_bitwise_identical(pool):
    pool.run(C.check_deterministic, BACKEND, C.Case(routing="zipf", seed=10, dtype=torch.bfloat16))


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("hook", [False, True], ids=["direct", "hook"])
def test_low_latency(pool, use_fp8, hook):
    pool.run(C.check_low_latency, BACKEND, C.Case(routing="masked", seed=9, hidden=128), use_fp8, hook)
