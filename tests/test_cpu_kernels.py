"""``moe_comm._cpu.bag_sum`` (the portable backend's compiled CPU combine reduction) against references.

Unit tests in this process: every fp16/bf16 value through the conversions, float32 -> fp16/bf16 rounding
against PyTorch's casts on ties, subnormals and the overflow edge, bags against a per-token Python sum, bad
arguments. Then combine on 3 gloo ranks, compiled vs the pure-PyTorch path, bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_comm import cpu_kernels
from moe_comm.buffer import Buffer
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


# --- combine on 3 ranks: the compiled reduction against the pure-PyTorch one ------------------------------

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


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_biases", [0, 2])
def test_combine_compiled_equals_fallback(pool, dtype: torch.dtype, num_biases: int) -> None:
    pool.run(check_combine_paths_agree, dtype, num_biases, "uniform")


@pytest.mark.parametrize("routing", ["zipf", "one_rank", "empty_rank", "masked"])
def test_combine_compiled_equals_fallback_routings(pool, routing: str) -> None:
    pool.run(check_combine_paths_agree, torch.bfloat16, 1, routing)
