"""``moe_comm._cpu`` (the portable backend's compiled CPU kernels) against references.

Unit tests in this process: for ``bag_sum``, every fp16/bf16 value through the conversions, float32 ->
fp16/bf16 rounding against PyTorch's casts on ties, subnormals and the overflow edge, bags against a
per-token Python sum; ``localize_topk`` against a per-entry Python
loop; bad arguments. Then dispatch and combine on 3 gloo ranks, compiled vs the pure-PyTorch path, bitwise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from moe_comm import cpu_kernels
from moe_comm.buffer import Buffer
from moe_comm.fp8 import per_token_cast_to_fp8
from tests.conformance import Case, make_inputs
from tests.harness import pool_fixture

pytestmark = pytest.mark.skipif(not cpu_kernels.available()[0], reason=cpu_kernels.available()[1])

REDUCED = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_bag_sum(rows: torch.Tensor, bags: list[list[int]], biases: list[torch.Tensor]) -> torch.Tensor:
    """Per token, in Python: 0, then each bag row upcast and added in order, then the biases; one cast."""
    acc = acc_dtype(rows.dtype)
    out = torch.empty(len(bags), rows.shape[1], dtype=rows.dtype)
    for t, bag in enumerate(bags):
        total = torch.zeros(rows.shape[1], dtype=acc)
        for e in bag:
            total = total + rows[e].to(acc)
        for b in biases:
            total = total + b[t]
        out[t] = total.to(rows.dtype)
    return out


def run_bags(rows: torch.Tensor, bags: list[list[int]], biases: list[torch.Tensor]) -> torch.Tensor:
    element_row = torch.tensor([e for bag in bags for e in bag], dtype=torch.int64)
    bag_end = torch.tensor([len(bag) for bag in bags], dtype=torch.int64).cumsum(0)
    out = torch.full((len(bags), rows.shape[1]), 7, dtype=rows.dtype)  # every element must be overwritten
    cpu_kernels.bag_sum(rows, element_row, bag_end, biases, out)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, any NaN matching any NaN (the kernel writes the canonical quiet NaN)."""
    both_nan = a.isnan() & b.isnan()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | both_nan).all())


@pytest.mark.parametrize("dtype", REDUCED)
def test_every_16_bit_value_round_trips(dtype: torch.dtype) -> None:
    """A bag of one row gives that row back: exact upcast and exact rounding of every fp16/bf16 value."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 64)
    out = run_bags(values, [[i] for i in range(values.shape[0])], [])
    # 0 + (-0) is +0, as in the reference's float32 sum.
    assert same_bits(out, (torch.zeros((), dtype=torch.float32) + values.float()).to(dtype))


def test_fp16_conversions_hold_under_flush_to_zero() -> None:
    """fp16 subnormals never become float32 subnormals on the way, so flushing those changes nothing."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(-1, 64)
    bags = [[i] for i in range(values.shape[0])]
    expected = run_bags(values, bags, [])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        flushed = run_bags(values, bags, [])
    finally:
        torch.set_flush_denormal(False)
    assert same_bits(flushed, expected)


@pytest.mark.parametrize("dtype", REDUCED)
def test_float32_rounding_matches_torch_casts(dtype: torch.dtype) -> None:
    """An empty bag plus a float32 bias is the bias rounded: random bit patterns and the hard cases."""
    gen = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    ulp_edges = (1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11)  # exact ties for bf16 and fp16
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-14,
         2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-25, 2.0**-15 + 2.0**-25, 1e-40, -1e-40, 3.4e38, *ulp_edges],
        dtype=torch.float32,
    )
    halves = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    midpoints = (halves[:-1] + halves[1:]) / 2  # fp16 ties (exact in float32)
    values = torch.cat([random_bits.view(torch.float32), specials, midpoints, -midpoints])
    values = values[: values.numel() // 32 * 32].reshape(-1, 32)
    out = run_bags(torch.zeros(1, 32, dtype=dtype), [[] for _ in range(values.shape[0])], [values])
    assert same_bits(out, (torch.zeros((), dtype=torch.float32) + values).to(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_biases", [0, 1, 2])
def test_bags_match_a_per_token_sum(dtype: torch.dtype, num_biases: int) -> None:
    """Random bags (empty, repeated rows, long) over random rows; bf16 rows make float32 ties common."""
    gen = torch.Generator().manual_seed(7 + num_biases)
    hidden = 1040  # two tiles and a remainder
    rows = torch.randn(50, hidden, generator=gen, dtype=torch.float64).to(dtype)
    sizes = torch.randint(0, 6, (40,), generator=gen).tolist()
    sizes[3] = 0
    sizes[5] = 17
    bags = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in sizes]
    bags[7] = [4, 4, 4]
    biases = [torch.randn(40, hidden, generator=gen, dtype=torch.float64).to(acc_dtype(dtype)) for _ in range(num_biases)]
    assert same_bits(run_bags(rows, bags, biases), reference_bag_sum(rows, bags, biases))


def test_threads_do_not_change_the_result() -> None:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(600, 256, generator=gen).to(torch.bfloat16)
    bags = [torch.randint(0, 600, (4,), generator=gen).tolist() for _ in range(512)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_bags(rows, bags, [])
        torch.set_num_threads(4)
        four = run_bags(rows, bags, [])
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one.view(torch.int16), four.view(torch.int16))


def test_bad_arguments_are_named() -> None:
    rows = torch.randn(4, 16).to(torch.bfloat16)
    out = torch.empty(2, 16, dtype=torch.bfloat16)
    ends = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="element_row: index 4 at 1"):
        cpu_kernels.bag_sum(rows, torch.tensor([0, 4]), ends, [], out)
    with pytest.raises(ValueError, match="element_row: index -1"):
        cpu_kernels.bag_sum(rows, torch.tensor([-1, 0]), ends, [], out)
    with pytest.raises(ValueError, match="bag_end: not a non-decreasing"):
        cpu_kernels.bag_sum(rows, torch.tensor([0, 1]), torch.tensor([2, 1]), [], out)
    with pytest.raises(ValueError, match="bag_end: the last bag ends at 1"):
        cpu_kernels.bag_sum(rows, torch.tensor([0, 1]), torch.tensor([1, 1]), [], out)
    with pytest.raises(ValueError, match="out: expected torch.bfloat16"):
        cpu_kernels.bag_sum(rows, torch.tensor([0, 1]), ends, [], out.float())
    with pytest.raises(ValueError, match=r"biases\[0\]: expected torch.float32"):
        cpu_kernels.bag_sum(rows, torch.tensor([0, 1]), ends, [torch.zeros(2, 16, dtype=torch.bfloat16)], out)
    with pytest.raises(ValueError, match="rows: must be a contiguous"):
        cpu_kernels.bag_sum(rows.t(), torch.tensor([0, 1]), ends, [], out)
    with pytest.raises(ValueError, match="rows: dtype"):
        cpu_kernels.bag_sum(rows.to(torch.int16), torch.tensor([0, 1]), ends, [], out)


def test_forced_off_reports_why() -> None:
    with cpu_kernels.forced_off():
        ok, why = cpu_kernels.available()
        assert not ok and "MOE_COMM_CPU_KERNELS" in why
        with pytest.raises(RuntimeError, match="disabled"):
            cpu_kernels.bag_sum(torch.zeros(1, 16), torch.tensor([0]), torch.tensor([1]), [], torch.empty(1, 16))
    assert cpu_kernels.available()[0]


def reference_localize(ids: torch.Tensor, weights: torch.Tensor, first: int, num_local: int):
    local = torch.full(ids.shape, -1, dtype=torch.int64)
    masked = torch.zeros(ids.shape, dtype=torch.float32)
    counts = [0] * num_local
    for r in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[r, k])
            if first <= e < first + num_local:
                local[r, k] = e - first
                masked[r, k] = weights[r, k]
                counts[e - first] += 1
    return local, masked, torch.tensor(counts, dtype=torch.int64)


@pytest.mark.parametrize("first, num_local", [(0, 8), (24, 8), (16, 1), (0, 32)])
def test_localize_topk_matches_a_python_loop(first: int, num_local: int) -> None:
    """Ids from -1 to past the last expert, read through strided views as the side channel holds them."""
    gen = torch.Generator().manual_seed(first + num_local)
    packed = torch.randint(0, 256, (60, 80), generator=gen, dtype=torch.int64).to(torch.uint8)
    ids = packed[:, 16:48].view(torch.int32)  # [60, 8], row stride 20
    weights = packed[:, 48:80].view(torch.float32)
    ids.copy_(torch.randint(-1, 40, ids.shape, generator=gen, dtype=torch.int32))
    weights.copy_(torch.randn(weights.shape, generator=gen))
    local = torch.empty(60, 8, dtype=torch.int64)
    masked = torch.empty(60, 8)
    counts = cpu_kernels.localize_topk(ids, weights, first, num_local, local, masked)
    ref_local, ref_masked, ref_counts = reference_localize(ids, weights, first, num_local)
    assert torch.equal(local, ref_local) and torch.equal(counts, ref_counts)
    assert torch.equal(masked.view(torch.int32), ref_masked.view(torch.int32))  # +0.0 where not local
    only_ids = torch.empty(60, 8, dtype=torch.int64)
    assert torch.equal(cpu_kernels.localize_topk(ids, None, first, num_local, only_ids, None), ref_counts)
    assert torch.equal(only_ids, ref_local)


def test_localize_topk_errors() -> None:
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="give both or neither"):
        cpu_kernels.localize_topk(ids, torch.zeros(4, 2), 0, 4, torch.empty(4, 2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="global_ids: expected torch.int32"):
        cpu_kernels.localize_topk(ids.long(), None, 0, 4, torch.empty(4, 2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="global_ids: each row must be contiguous"):
        cpu_kernels.localize_topk(ids.t(), None, 0, 4, torch.empty(2, 4, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="local_ids: expected torch.int64 \\[4, 2\\]"):
        cpu_kernels.localize_topk(ids, None, 0, 4, torch.empty(4, 3, dtype=torch.int64), None)


# --- dispatch and combine on 3 ranks: the compiled reduction against the pure-PyTorch one ------------------------------

pool = pool_fixture(3)


def check_combine_paths_agree(dtype: torch.dtype, num_biases: int, routing: str) -> None:
    """The same combine (weights, biases) with and without moe_comm._cpu gives the same bits on every rank."""
    case = Case(routing=routing, tokens=40, hidden=136, dtype=dtype, seed=num_biases)
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(num_experts=case.experts_per_rank * world)
    x, idx, w = make_inputs(case, rank, world)
    res = buf.dispatch(x, topk_idx=idx, topk_weights=w)
    gen = torch.Generator().manual_seed(100 + rank)
    expert_out = torch.randn(res.recv_x.shape, generator=gen, dtype=torch.float64).to(dtype)
    bias = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(num_biases))
    kwargs = dict(topk_weights=res.recv_topk_weights, bias=(bias + (None, None))[:2] if bias else None)
    compiled = buf.combine(expert_out, res.handle, **kwargs)
    with cpu_kernels.forced_off():
        fallback = buf.combine(expert_out, res.handle, **kwargs)
    assert same_bits(compiled.combined_x, fallback.combined_x), f"rank {rank}: combined rows differ"
    assert torch.equal(compiled.combined_topk_weights, fallback.combined_topk_weights)
    buf.destroy()


def check_dispatch_paths_agree(routing: str, worst_case: bool, fp8: bool) -> None:
    """The same dispatch (and its cached form) with and without moe_comm._cpu: every output, bitwise."""
    case = Case(routing=routing, tokens=40, hidden=256, dtype=torch.bfloat16, seed=3)
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(num_experts=case.experts_per_rank * world)
    x, idx, w = make_inputs(case, rank, world)
    payload = per_token_cast_to_fp8(x) if fp8 else x
    kwargs = dict(topk_idx=idx, topk_weights=w, expert_alignment=4, num_worst_tokens=world * 64 if worst_case else 0)
    compiled = buf.dispatch(payload, **kwargs)
    cached = buf.dispatch(payload, handle=compiled.handle)
    with cpu_kernels.forced_off():
        fallback = buf.dispatch(payload, **kwargs)
        fallback_cached = buf.dispatch(payload, handle=fallback.handle)
    for a, b in ((compiled, fallback), (cached, fallback_cached)):
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list"):
            left, right = getattr(a, name), getattr(b, name)
            if isinstance(left, tuple):
                left, right = torch.cat([t.view(torch.uint8).flatten() for t in left]), torch.cat([t.view(torch.uint8).flatten() for t in right])
            elif isinstance(left, torch.Tensor):
                left, right = left.view(torch.uint8), right.view(torch.uint8)
            same = torch.equal(left, right) if isinstance(left, torch.Tensor) else left == right
            assert same, f"rank {rank}: {name} differs"
    assert torch.equal(compiled.handle.recv_src_idx, fallback.handle.recv_src_idx)
    buf.destroy()


@pytest.mark.parametrize("routing", ["uniform", "zipf", "empty_rank", "masked"])
@pytest.mark.parametrize("worst_case", [False, True])
def test_dispatch_compiled_equals_fallback(pool, routing: str, worst_case: bool) -> None:
    pool.run(check_dispatch_paths_agree, routing, worst_case, routing == "masked")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_biases", [0, 2])
def test_combine_compiled_equals_fallback(pool, dtype: torch.dtype, num_biases: int) -> None:
    pool.run(check_combine_paths_agree, dtype, num_biases, "uniform")


@pytest.mark.parametrize("routing", ["zipf", "one_rank", "empty_rank", "masked"])
def test_combine_compiled_equals_fallback_routings(pool, routing: str) -> None:
    pool.run(check_combine_paths_agree, torch.bfloat16, 1, routing)



def test_a_bad_module_override_is_reported_not_raised() -> None:
    """``MOE_COMM_CPU_MODULE`` (sanitizer builds) naming no extension leaves the PyTorch path, with the reason."""
    probe = "from moe_comm import cpu_kernels; ok, why = cpu_kernels.available(); print(ok, why)"
    env = {**os.environ, "MOE_COMM_CPU_MODULE": "/nonexistent/_cpu.so"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "/nonexistent/_cpu.so" in out
