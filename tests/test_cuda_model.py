"""The ``cuda`` backend's host code on CPU ranks, against a model of its kernels (tests/cuda_model).

Each rank is a process of a RankPool (gloo); the model is installed inside the rank processes only, never
in this one. The real host code (Buffer, CudaBackend, SymmetricBuffer, the launch wrappers) runs unchanged
over symmetric buffers shared between the rank processes, first against sequential Python transcriptions of
the kernels, then against the CUDA source itself, compiled for the host and run with a fiber per CUDA thread
(``moe_comm._C_simt``, docs/kernels.md), in forward, reverse or shuffled block and thread order. Checked here:
the conformance suite (tests/conformance.py) with ``backend="cudasim"``, bitwise agreement with the ``torch``
backend, the stream ordering of every synchronous operation, the wrap of the int32 epochs, and that planted
faults fail the checks. Not checked: a GPU's memory ordering, concurrency between blocks and GPUs,
and performance; scripts/gpu_check.sh covers those on a GPU. Skipped when ``moe_comm._C`` was not built, and
where a CUDA device is usable (tests/gpu runs the real kernels there).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.cuda_model import skip_module_unless_modelled

skip_module_unless_modelled()

from moe_comm.launch import RankPool  # noqa: E402
from tests import conformance  # noqa: E402
from tests.conformance import ROUTINGS, Case, conformance_tests  # noqa: E402
from tests.cuda_model import checks, install  # noqa: E402
from tests.cuda_model.simt import simt_built  # noqa: E402

WORLD_SIZES = (1, 2, 3, 4)


class ModelPool:
    """A RankPool whose every run first installs the kernel model in the ranks (:func:`checks.on_model`)."""

    def __init__(self, ranks: RankPool, config: install.ModelConfig) -> None:
        self.ranks = ranks
        self.config = config

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        return self.ranks.run(checks.on_model, self.config, fn, *args, timeout_s=timeout_s, **kwargs)


# The pools: the kernel transcriptions at 1 to 4 ranks, then the CUDA source itself on CPU fibers
# (tests/cuda_model/simt.py) at 1 to 4 and 8 ranks, its block and thread orders varied, since a missing barrier
# gives wrong results in some orders only.
POOLS = [("python", "forward", n) for n in WORLD_SIZES] + [
    ("simt", order, n) for n, order in zip((*WORLD_SIZES, 8), ("shuffled", "forward", "reverse", "forward", "shuffled"),
                                           strict=True)]


def _pool_id(pool: tuple[str, str, int]) -> str:
    kernels, order, world = pool
    return f"ranks{world}" if kernels == "python" else f"simt-{order}-ranks{world}"


@pytest.fixture(scope="module", params=POOLS, ids=[_pool_id(p) for p in POOLS])
def pool(request: pytest.FixtureRequest) -> Iterator[ModelPool]:
    kernels, order, world = request.param
    if kernels == "simt" and not simt_built():
        pytest.skip("moe_comm._C_simt is not built")
    memory_dir = tempfile.mkdtemp(prefix="moe_comm_model_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with RankPool(world, default_timeout_s=120.0) as ranks:
            yield ModelPool(ranks, install.ModelConfig(memory_dir, kernels=kernels, order=order))
    finally:
        shutil.rmtree(memory_dir, ignore_errors=True)


# The shared conformance suite, on the model-backed cuda backend.
globals().update(conformance_tests(install.MODEL_BACKEND))


# ----------------------------------------------------------------------------------------------------
# bitwise against the torch backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_matches_torch_backend(pool, routing, dtype):
    pool.run(checks.check_vs_torch, Case(routing=routing, seed=11, dtype=dtype))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_worst_case_matches_torch_backend(pool, routing):
    pool.run(checks.check_vs_torch, Case(routing=routing, seed=12), worst=True)


@pytest.mark.parametrize("worst", [False, True], ids=["exact", "worst"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_fp8_matches_torch_backend(pool, routing, worst):
    pool.run(checks.check_vs_torch, Case(routing=routing, seed=13, hidden=384), fp8=True, worst=worst)


def test_unweighted_aligned_async_matches_torch_backend(pool):
    pool.run(checks.check_vs_torch, Case(seed=15), weights=False, bias=False, alignment=4, async_finish=True)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("hook", [False, True], ids=["direct", "hook"])
def test_low_latency_matches_torch_backend(pool, use_fp8, hook):
    pool.run(checks.check_low_latency_vs_torch, Case(routing="masked", seed=16, hidden=256), use_fp8, hook)


# ----------------------------------------------------------------------------------------------------
# protocol


# Shapes at the edges of what the kernels accept, each on its own number of blocks: a row of one 16-byte vector,
# rows that are not whole 512-byte warp sweeps (hidden 136 and 2880), DeepSeek-V3's 7168, top-k 1, 9 and 32.
EDGE_SHAPES = {
    "h8-k1-sms1": (dict(hidden=8, num_topk=1, experts_per_rank=1), 1),
    "h136-k9-sms3": (dict(hidden=136, num_topk=9, experts_per_rank=5, routing="masked"), 3),
    "h2880-k32-sms7": (dict(hidden=2880, num_topk=32, experts_per_rank=8, routing="zipf", tokens=20), 7),
    "h7168-k8-sms2": (dict(hidden=7168, num_topk=8, experts_per_rank=4, tokens=6), 2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", sorted(EDGE_SHAPES))
def test_edge_shapes_match_torch_backend(pool, shape, dtype):
    fields, num_sms = EDGE_SHAPES[shape]
    pool.run(checks.check_vs_torch, Case(seed=23, dtype=dtype, **fields), num_sms=num_sms)


# FP8 rows are one byte per channel, so hidden must be a multiple of 16 there.
EDGE_SHAPES_FP8 = {
    "h144-k9-sms3": (dict(hidden=144, num_topk=9, experts_per_rank=5, routing="masked"), 3),
    "h7168-k8-sms2": EDGE_SHAPES["h7168-k8-sms2"],
}


@pytest.mark.parametrize("shape", sorted(EDGE_SHAPES_FP8))
def test_edge_shapes_fp8_match_torch_backend(pool, shape):
    fields, num_sms = EDGE_SHAPES_FP8[shape]
    pool.run(checks.check_vs_torch, Case(seed=24, **fields), fp8=True, worst=True, num_sms=num_sms)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_low_latency_edge_shapes_match_torch_backend(pool, use_fp8):
    case = Case(routing="zipf", seed=25, hidden=2880, num_topk=9, experts_per_rank=5, tokens=10)
    pool.run(checks.check_low_latency_vs_torch, case, use_fp8, False, num_sms=3)


def test_caller_stream_waits_for_every_launch(pool):
    pool.run(checks.check_stream_order, Case(routing="zipf", seed=17))


def test_launch_grids_bounded_by_num_sms(pool):
    if pool.config.kernels != "simt":
        pytest.skip("the Python transcriptions have no grids")
    pool.run(checks.check_grids_bounded_by_num_sms, Case(routing="zipf", seed=22))


def test_previous_event_orders_the_computed_layout(pool):
    pool.run(checks.check_previous_event_orders_the_computed_layout, Case(seed=21))


@pytest.mark.parametrize("kind", ["low_latency", "low_latency_fp8", "worst_case"])
def test_replayed_launches_match_eager_steps(pool, kind):
    pool.run(checks.check_replayed_launches, Case(routing="masked", seed=18, hidden=256), kind)


def test_missing_sender_times_out_naming_it(pool):
    outcomes = pool.run(checks.check_missing_sender_times_out, Case(seed=20))
    assert "expired" in outcomes, outcomes  # the first wait to expire names the missing rank


def test_epochs_wrap(pool):
    pool.run(checks.check_epochs_wrap, Case(seed=22))


@pytest.mark.parametrize("fault", sorted(checks.FAULTS))
def test_planted_fault_fails_conformance(pool, fault):
    failures = pool.run(checks.failure_under_fault, fault, conformance.check_dispatch_combine, install.MODEL_BACKEND,
                        Case(seed=19))
    assert all(failures), f"{fault}: the conformance check passed on ranks {[r for r, f in enumerate(failures) if not f]}"


def test_runner_process_is_untouched(pool):
    """The model lives in the rank processes only: this process still has the real extension and torch.cuda."""
    assert not install.installed()
    extension = sys.modules.get("moe_comm._C")
    assert extension is None or getattr(extension, "__file__", None), "moe_comm._C was replaced in the test runner"
    for patched in (torch.cuda.is_available, torch.cuda.current_stream, torch.cuda.stream, torch.Tensor.pin_memory):
        assert not getattr(patched, "__module__", "").startswith("tests."), f"{patched} is patched in the test runner"
