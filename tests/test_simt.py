"""csrc/simt, the runtime that runs the CUDA kernels on CPU fibers (``moe_comm._C_simt``), on its selftest kernels
(csrc/simt/selftest.cpp): warp collectives and barriers give a GPU's values, blocks run in the configured order,
and code that is undefined on a GPU (divergent collectives or barriers, a missing barrier) fails or shows.
tests/test_cuda_model.py runs the repository's kernels on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cuda_model.simt import ORDERS, simt_built, simt_module

if not simt_built():
    pytest.skip("moe_comm._C_simt is not built (setup.py builds it with moe_comm._C)", allow_module_level=True)

simt = simt_module()

BLOCKS, THREADS = 3, 64


@pytest.fixture(params=sorted(ORDERS), autouse=True)
def order(request: pytest.FixtureRequest) -> Iterator[str]:
    simt.simt_configure(ORDERS[request.param], 5)
    yield request.param
    simt.simt_configure(ORDERS["forward"], 0)


def run(name: str, blocks: int = BLOCKS, threads: int = THREADS) -> list[int]:
    error, out = simt.simt_selftest(name, blocks, threads)
    assert error == "", error
    return out


def fails(name: str) -> str:
    error, _ = simt.simt_selftest(name, BLOCKS, THREADS)
    assert error, f"{name}: the launch succeeded"
    return error


def test_warp_collectives_give_the_gpu_values():
    out = run("collectives")
    for t in range(BLOCKS * THREADS):
        lane, base = t % 32, 1000 * ((t % THREADS) // 32)  # lane src of this warp holds base + src
        assert out[4 * t] == base + (lane + 3) % 32, t
        assert out[4 * t + 1] == base + (lane ^ 5), t
        assert out[4 * t + 2] == base + (lane & ~7) + 2, t
        assert out[4 * t + 3] == sum(1 << i for i in range(0, 32, 3)), t


def test_syncthreads_and_reduces_over_the_block():
    assert run("barrier_and")[: BLOCKS * THREADS] == [1] * (BLOCKS * THREADS)  # 10 * (thread 5 said no) + 1


def test_shared_memory_is_per_block_and_ordered_by_barriers():
    out = run("shared_with_barrier")
    assert out[: BLOCKS * THREADS] == [42 + t // THREADS for t in range(BLOCKS * THREADS)]


def test_missing_barrier_gives_stale_reads():
    out = run("shared_without_barrier")
    assert -1 in out[: BLOCKS * THREADS], "every thread saw thread 0's write without a barrier"


@pytest.mark.parametrize("name", ["shared_overwritten_with_barrier", "shared_overwritten_without_barrier"])
def test_write_after_read_hazard_is_invisible_to_thread_orders(name):
    """Without its barrier the overwrite races the reads, yet every order reads 1: what scripts/simt_tsan.sh
    (tests/test_simt_tsan.py) is for."""
    assert run(name)[: BLOCKS * THREADS] == [1] * (BLOCKS * THREADS)


def test_blocks_run_in_the_configured_order(order):
    out = run("block_order", blocks=6, threads=32)[:6]
    assert sorted(out) == list(range(6))
    if order == "forward":
        assert out == list(range(6))
    elif order == "reverse":
        assert out == list(range(5, -1, -1))


def test_blocks_meet_through_atomics_and_fences():
    blocks, threads = 5, 64
    out = run("blocks_sum_then_last_adds", blocks=blocks, threads=threads)
    per_block = threads * (threads + 1) // 2
    assert out[1:1 + blocks] == [per_block] * blocks
    assert out[0] == blocks * per_block


def test_blocks_storing_one_word_leave_one_of_theirs(order):
    """A race between blocks on a GPU; here the last block to run wins (tests/test_simt_tsan.py reports it)."""
    out = run("blocks_store_one_word", blocks=4, threads=32)
    assert out[0] == {"forward": 3, "reverse": 0}.get(order, out[0]) and 0 <= out[0] < 4


def test_shared_memory_starts_as_garbage_in_every_block():
    garbage = int.from_bytes(b"\xa5" * 4, "little", signed=True)
    assert set(run("shared_uninitialised")[: 2 * BLOCKS * THREADS]) == {garbage}


@pytest.mark.parametrize("name,message", [
    ("divergent_shuffle", "divergent warp collective"),
    ("shuffle_after_lanes_returned", "lanes 16-31 have returned"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("barrier_after_return", "__syncthreads reached after threads returned"),
    ("partial_mask", "mask other than 0xffffffff"),
])
def test_undefined_behaviour_fails_the_launch_naming_the_line(name, message):
    error = fails(name)
    assert message in error and "selftest.cpp:" in error, error


def test_bad_arguments_are_named():
    assert "no selftest kernel named nope" in fails("nope")
    error, _ = simt.simt_selftest("collectives", 1, 48)
    assert "multiple of 32" in error, error
    with pytest.raises(RuntimeError, match="order"):
        simt.simt_configure(3, 0)
