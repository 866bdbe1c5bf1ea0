"""Combine's reduction in the portable backend: each token's returned rows summed in rank order.

Every token owner receives one row per (token, rank the token reached), rank by rank in token order, and sums
a token's rows in float32 (float64 for float64 rows), adds the biases in the same sum, and rounds once to the
output dtype. Three implementations give bitwise the same results:

- :func:`reduce_compiled`: one pass of ``moe_comm._cpu``'s ``bag_sum`` (CPU, when the extension is built);
- :func:`reduce_in_bags`: ``embedding_bag`` over token blocks (CPU without the extension);
- :func:`reduce_at_source`: one ``index_add_`` per rank into a float32 accumulator (GPU, worst-case blocks).

Each returns a :class:`~moe_comm.backends.base.CombineOutput` whose ``finish`` waits for the transfer
``works`` and then reduces. Legend: T tokens, H hidden, K top-k, R ranks, S returned rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe_comm import cpu_kernels, host_memory
from moe_comm.backends.base import CombineOutput, CombineRequest
from moe_comm.backends.torch_staging import ScratchPool, row_offsets
from moe_comm.collectives import StepContext, wait_all

__all__ = ["accumulation_dtype", "reduce_at_source", "reduce_compiled", "reduce_in_bags", "sum_weights"]


# Size of the float32 scratch that combine's reduction upcasts at a time on the CPU.
_CPU_CHUNK_BYTES = 1 << 20


def sum_weights(back_w: torch.Tensor, pieces: Sequence[tuple[torch.Tensor, int, int]], rows: int) -> torch.Tensor:
    """``[rows, K]`` float32: the returned top-k weights ``back_w`` summed per target row, rank by rank.

    ``pieces`` holds, per rank, the target row of each of its rows and their range in ``back_w``.
    """
    acc_w = torch.zeros(rows, back_w.shape[1], dtype=torch.float32, device=back_w.device)
    for targets, start, stop in pieces:
        if stop > start:
            acc_w.index_add_(0, targets, back_w[start:stop])
    return acc_w


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def bags_round_once_to_nearest_even(dtype: torch.dtype) -> bool:
    """Whether ``embedding_bag(..., padding_idx=...)`` on a CPU table of ``dtype`` sums in float32 and rounds
    once to nearest even, as a cast does.

    Without ``padding_idx`` PyTorch hands bf16/fp16 bags to fbgemm, which rounds exact ties away from zero
    (8% of the elements of a sum of bf16 rows); with it, ATen's own kernel does the float32 sum. That is an
    implementation detail, so it is probed once on a tie: 1 + 2^-8 lies halfway between two bf16 (and, with
    2^-11, two fp16) values, and the even one is 1.
    """
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    table = torch.tensor([[1.0], [half_ulp], [0.0]], dtype=dtype)
    total = torch.nn.functional.embedding_bag(torch.tensor([0, 1]), table, torch.tensor([0]), mode="sum", padding_idx=2)
    return bool(total.item() == 1.0)


def reduce_in_bags(
    ctx: StepContext,
    works: list[dist.Work | None],
    request: CombineRequest,
    back_x: torch.Tensor,
    back_w: torch.Tensor | None,
    pieces: list[tuple[torch.Tensor, int, int]],
    step: str,
    pool: ScratchPool,
) -> CombineOutput:
    """Sum every token's returned rows on the CPU, token block by token block, with ``embedding_bag``.

    Rank r returned its rows in token order, so the rows of a block of tokens are one contiguous range
    per rank. The block upcasts those ranges (and its bias rows) into a small accumulation-dtype
    scratch that stays in cache, then one ``embedding_bag`` adds up each token's bag (its ranks' rows in
    rank order, then bias, then the second bias) from the first element on, and the block is rounded
    once into the output. The sums, their order and the rounding are those of
    :func:`reduce_at_source` (``0 + row_0 + row_1 + ... + bias``): the results are bitwise the same,
    at about twice the speed of staging the rows and adding them with elementwise ops. Without biases
    the bags index the received rows directly (no upcast copy; half the time again).

    ``back_x`` holds one spare row after the received ones.
    """
    handle, x = request.handle, request.x
    num_tokens, hidden, world = handle.num_tokens, x.shape[1], handle.num_ranks
    device = x.device
    acc_dtype = accumulation_dtype(x.dtype)
    biases = [b for b in request.bias if b is not None]
    members = torch.cat(
        [handle.is_token_in_rank.to(device), torch.ones(num_tokens, len(biases), dtype=torch.bool, device=device)], dim=1
    )  # [T, R + biases]: the elements of each token's bag, in summation order
    # Rows of rank r up to token t, shifted by rank r's first row: rank_rows[t, r] is where the block that
    # starts at token t finds rank r's rows; rank_rows[t, R + i] = t places bias i's row in the same way.
    first = torch.tensor(row_offsets(handle.send_counts)[:-1] + [0] * len(biases), dtype=torch.int64, device=device)
    rank_rows = torch.zeros(num_tokens + 1, members.shape[1], dtype=torch.int64, device=device)
    torch.cumsum(members, dim=0, out=rank_rows[1:])
    rank_rows.add_(first)
    element_row = rank_rows[:-1][members]
    bag_end = members.sum(dim=1, dtype=torch.int64).cumsum(dim=0)
    # Without biases every bag element is a received row: the bags can index back_x itself and skip the
    # upcast copy, where embedding_bag sums in float32 and rounds once to nearest even on its own.
    reduced = x.dtype in (torch.bfloat16, torch.float16)
    direct = not biases and (not reduced or bags_round_once_to_nearest_even(x.dtype))
    # Token-major: which rank (or bias) each bag element is from (the upcast path's scratch offsets).
    element_source = None if direct else members.nonzero()[:, 1]
    # Tokens per block, so that what a block writes stays in cache: the direct path's output block
    # (a quarter of the chunk: 128 bf16 tokens of 1024 measured best), or the upcast scratch.
    if direct:
        block = (_CPU_CHUNK_BYTES // 4) // (x.element_size() * max(hidden, 1))
    else:
        block = 2 * _CPU_CHUNK_BYTES // (acc_dtype.itemsize * max(hidden, 1))
    block = min(max(16, block), max(num_tokens, 1))
    starts = list(range(0, num_tokens, block))
    bounds = rank_rows[starts + [num_tokens]].tolist() if num_tokens else []
    element_bounds = [0] + bag_end[[min(s + block, num_tokens) - 1 for s in starts]].tolist() if num_tokens else []
    combined = host_memory.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    combined_w = None
    if back_w is not None:
        combined_w = torch.empty(num_tokens, back_w.shape[1], dtype=torch.float32, device=device)

    def finish_direct() -> None:
        wait_all(ctx, works, step)
        # back_x ends in a spare row no bag names: as padding_idx it keeps bf16/fp16 bags off fbgemm.
        padding = {"padding_idx": back_x.shape[0] - 1} if reduced else {}
        for i, lo in enumerate(starts):
            hi = min(lo + block, num_tokens)
            e0, e1 = element_bounds[i], element_bounds[i + 1]
            if e1 == e0:
                combined[lo:hi].zero_()
                continue
            bag_offsets = torch.cat([bag_end.new_zeros(1), bag_end[lo : hi - 1] - e0])
            combined[lo:hi].copy_(torch.nn.functional.embedding_bag(element_row[e0:e1], back_x, bag_offsets, mode="sum", **padding))
        if combined_w is not None and back_w is not None:
            combined_w.copy_(sum_weights(back_w, pieces, num_tokens))
        pool.give(back_x)

    def finish() -> None:
        wait_all(ctx, works, step)
        sources = [back_x] * world + biases
        scratch = pool.take((members.shape[1] * block, hidden), acc_dtype, device)
        for i, lo in enumerate(starts):
            hi = min(lo + block, num_tokens)
            begin, end = bounds[i], bounds[i + 1]
            shift, base = [], 0
            for source, a, b in zip(sources, begin, end, strict=True):
                scratch[base : base + b - a].copy_(source[a:b])
                shift.append(base - a)
                base += b - a
            e0, e1 = element_bounds[i], element_bounds[i + 1]
            assert element_source is not None
            local = element_row[e0:e1] + torch.tensor(shift, dtype=torch.int64, device=device)[element_source[e0:e1]]
            bag_offsets = torch.cat([bag_end.new_zeros(1), bag_end[lo : hi - 1] - e0])
            if base:
                combined[lo:hi].copy_(torch.nn.functional.embedding_bag(local, scratch[:base], bag_offsets, mode="sum"))
            else:
                combined[lo:hi].zero_()
        if combined_w is not None and back_w is not None:
            combined_w.copy_(sum_weights(back_w, pieces, num_tokens))
        pool.give(scratch, back_x)

    return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish_direct if direct else finish)


def reduce_compiled(
    ctx: StepContext,
    works: list[dist.Work | None],
    request: CombineRequest,
    back_x: torch.Tensor,
    back_w: torch.Tensor | None,
    pieces: list[tuple[torch.Tensor, int, int]],
    step: str,
    pool: ScratchPool,
) -> CombineOutput:
    """:func:`reduce_in_bags` in one pass of ``moe_comm._cpu``'s ``bag_sum``: the same bags (each token's
    returned rows in rank order), the same float32 sums and rounding, each row read once and each output
    row written once. About twice as fast as ``embedding_bag`` with its ``padding_idx`` (docs)."""
    handle, x = request.handle, request.x
    num_sent = sum(handle.send_counts or ())
    in_rank = handle.is_token_in_rank.to(x.device)
    # Rank r's row of token t is its count of earlier tokens, after the rows of ranks before r.
    first = torch.tensor(row_offsets(handle.send_counts or ())[:-1], dtype=torch.int64, device=x.device)
    element_row = (torch.cumsum(in_rank, dim=0) - in_rank.long() + first)[in_rank]
    bag_end = in_rank.sum(dim=1, dtype=torch.int64).cumsum(dim=0)
    acc_dtype = accumulation_dtype(x.dtype)
    biases = [b.to(acc_dtype).contiguous() for b in request.bias if b is not None]
    combined = host_memory.empty(handle.num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
    combined_w = None
    if back_w is not None:
        combined_w = torch.empty(handle.num_tokens, back_w.shape[1], dtype=torch.float32, device=x.device)

    def finish() -> None:
        wait_all(ctx, works, step)
        cpu_kernels.bag_sum(back_x[:num_sent], element_row, bag_end, biases, combined)
        if combined_w is not None and back_w is not None:
            combined_w.copy_(sum_weights(back_w, pieces, handle.num_tokens))
        pool.give(back_x)

    return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish)


def reduce_at_source(
    ctx: StepContext,
    works: list[dist.Work | None],
    request: CombineRequest,
    back_x: torch.Tensor,
    back_w: torch.Tensor | None,
    pieces: list[tuple[torch.Tensor, int, int]],
    step: str,
    pool: ScratchPool,
    spare_row: bool = False,
) -> CombineOutput:
    """Sum returned rows per token, rank by rank (unique targets per call: deterministic on GPU too)."""
    handle, x = request.handle, request.x
    num_tokens = handle.num_tokens
    acc_dtype = accumulation_dtype(x.dtype)
    extra = 1 if spare_row else 0
    combined = host_memory.empty(num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
    combined_w = None
    if back_w is not None:
        combined_w = torch.empty(num_tokens, back_w.shape[1], dtype=torch.float32, device=x.device)

    def finish() -> None:
        wait_all(ctx, works, step)
        acc = pool.take((num_tokens + extra, x.shape[1]), acc_dtype, x.device).zero_()
        # On the CPU the upcast goes chunk by chunk so that its float32 copy stays in cache (5x faster
        # than one pass over the whole tensor); on a GPU one kernel per rank is best.
        chunk = max(16, _CPU_CHUNK_BYTES // (4 * max(x.shape[1], 1))) if x.device.type == "cpu" else None
        for targets, start, stop in pieces:
            rows_at_once = chunk or max(stop - start, 1)
            for lo in range(start, stop, rows_at_once):
                hi = min(lo + rows_at_once, stop)
                acc.index_add_(0, targets[lo - start : hi - start], back_x[lo:hi].to(acc_dtype))
        result = acc[:num_tokens]
        for bias in request.bias:
            if bias is not None:
                result = result + bias.to(acc_dtype)
        combined.copy_(result)
        if combined_w is not None and back_w is not None:
            combined_w.copy_(sum_weights(back_w, pieces, num_tokens + extra)[:num_tokens])
        pool.give(acc, back_x)

    return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish)
