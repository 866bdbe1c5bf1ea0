"""Launch wrappers of the intranode kernels (csrc/kernels/intranode_*.cu, fp8_cast.cu) for one rank.

A dispatch is two launches per rank: ``dispatch_send`` (write my token records into every destination's
region for me) then ``dispatch_recv`` (wait for every source's flag, copy the regions out in (source rank,
token) order); a combine is ``combine_send`` then ``combine_recv``. :class:`moe_comm.backends.cuda.CudaBackend`
issues both halves of one rank on its stream; the single-GPU emulator (``cuda_emulator.py``) issues every
rank's send before any rank's receive. Senders never wait on the receivers of the same epoch, so either
order of issue is deadlock-free.

Shapes: T tokens on this rank, H hidden, K top-k, R ranks, S = ceil(H/128) FP8 scales, N received rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_comm.backends.cuda_memory import SymmetricBuffer
from moe_comm.fp8 import num_scale_blocks

__all__ = [
    "DispatchOutputs",
    "RoutingPlan",
    "allocate_dispatch_outputs",
    "combine_recv",
    "combine_record_bytes",
    "combine_send",
    "dispatch_record_bytes",
    "dispatch_recv",
    "dispatch_send",
    "dtype_code",
    "expert_major",
    "low_latency_combine_recv",
    "low_latency_combine_send",
    "make_plan",
    "per_token_cast_fp8",
]

_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def _ext() -> Any:
    from moe_comm.backends.cuda import extension

    return extension()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def dtype_code(dtype: torch.dtype) -> int:
    """The kernels' code for a reduction dtype (bf16, fp16, fp32, fp64)."""
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"x: the CUDA combine supports bf16, fp16, fp32 and fp64, got {dtype}")
    return _DTYPE_CODES[dtype]


def row_bytes_of(x: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of one row of ``x [rows, H]`` (as ``dtype`` when given: the FP8 row a fused cast sends); the kernels
    move rows in 16-byte vectors."""
    dtype = dtype or x.dtype
    nbytes = x.shape[1] * dtype.itemsize
    if nbytes == 0 or nbytes % 16:
        raise ValueError(f"x: a row of {x.shape[1]} x {dtype} is {nbytes} bytes; the CUDA backend needs a positive multiple of 16")
    return nbytes


def dispatch_record_bytes(row_bytes: int, num_scales: int, num_topk: int) -> int:
    return int(_ext().token_record_bytes(row_bytes, num_scales, num_topk))


def combine_record_bytes(row_bytes: int, num_topk: int) -> int:
    return int(_ext().combine_record_bytes(row_bytes, num_topk))


@dataclass(frozen=True, kw_only=True)
class RoutingPlan:
    """One rank's routing, kept in the handle for combine and cached dispatch.

    Attributes:
        is_token_in_rank: ``[T, R]`` bool.
        send_pos: ``[T, R]`` int32, position of token t among this rank's rows for rank r (valid where sent).
        num_tokens_per_rank: ``[R]`` int32, rows for each rank.
        recv_counts: ``[R]`` int32 on the device, rows received from each source (filled by the receive).
        max_rows: the most rows any rank sends any rank in this dispatch (the same on every rank); it sizes
            the regions.
        num_recv_rows: N, rows of the receive outputs (``num_worst_tokens`` in worst-case mode).
        send_token_idx: ``[S]`` int64, the tokens sent, destination-major then token order, -1 after them
            (the handle's ``send_token_idx``), or None where the call did not ask for it.
        recv_expert_counts: ``[E_local]`` int32 on the device, rows received for each local expert by the
            dispatch that made the plan (filled by its receive), or None where that call did not count.
    """

    is_token_in_rank: torch.Tensor
    send_pos: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    recv_counts: torch.Tensor
    max_rows: int
    num_recv_rows: int
    send_token_idx: torch.Tensor | None = None
    recv_expert_counts: torch.Tensor | None = None


def make_plan(
    is_token_in_rank: torch.Tensor,
    num_tokens_per_rank: torch.Tensor,
    max_rows: int,
    num_recv_rows: int,
    num_sms: int,
    stream: torch.cuda.Stream,
    num_sent: int | None = None,
    num_local_experts: int = 0,
) -> RoutingPlan:
    """The plan of ``is_token_in_rank [T, R]`` by the routing-plan kernel (``num_sms`` blocks at most, no host
    synchronisation): positions by a scan down the token axis and, with ``num_sent``, the ``[num_sent]`` list
    of sent tokens; with ``num_local_experts``, zeroed per-expert counts for the receive to fill."""
    in_rank = is_token_in_rank.contiguous()
    num_tokens, num_ranks = in_rank.shape
    dev = in_rank.device
    send_pos = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=dev)
    recv_counts = torch.empty(num_ranks, dtype=torch.int32, device=dev)
    send_token_idx = None if num_sent is None else torch.empty(num_sent, dtype=torch.int64, device=dev)
    expert_counts = torch.empty(num_local_experts, dtype=torch.int32, device=dev) if num_local_experts else None
    _ext().routing_plan(_ptr(in_rank), num_tokens, num_ranks, _ptr(send_pos), _ptr(send_token_idx), num_sent or 0,
                        recv_counts.data_ptr(), _ptr(expert_counts), num_local_experts, num_sms, stream.cuda_stream)
    return RoutingPlan(
        is_token_in_rank=in_rank,
        send_pos=send_pos,
        num_tokens_per_rank=num_tokens_per_rank.to(torch.int32).contiguous(),
        recv_counts=recv_counts,
        max_rows=int(max_rows),
        num_recv_rows=int(num_recv_rows),
        send_token_idx=send_token_idx,
        recv_expert_counts=expert_counts,
    )


@dataclass(frozen=True, kw_only=True)
class DispatchOutputs:
    """Receive-side tensors of one dispatch (``None`` where the call carries no such field)."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    recv_src_idx: torch.Tensor | None
    recv_src_rank: torch.Tensor | None
    recv_counts: torch.Tensor
    recv_expert_counts: torch.Tensor | None = None
    padded: bool = False


def allocate_dispatch_outputs(
    plan: RoutingPlan,
    x: torch.Tensor,
    num_scales: int,
    num_topk: int,
    has_weights: bool,
    with_src: bool,
    padded: bool,
    dtype: torch.dtype | None = None,
) -> DispatchOutputs:
    """Outputs of ``plan.num_recv_rows`` rows of ``x``'s width (and of ``dtype``, default ``x``'s: FP8 for a
    fused cast), uninitialised: the receive kernel writes every row, in worst-case mode (``padded``) the rows
    no source filled with the padding values (zeros, top-k id -1, source -1) too."""
    rows, hidden, dev = plan.num_recv_rows, x.shape[1], x.device
    src_idx = src_rank = None
    if with_src:
        src_idx = torch.empty(rows, dtype=torch.int32, device=dev)
        src_rank = torch.empty(rows, dtype=torch.int32, device=dev)
    return DispatchOutputs(
        recv_x=torch.empty(rows, hidden, dtype=dtype or x.dtype, device=dev),
        recv_scales=torch.empty(rows, num_scales, dtype=torch.float32, device=dev) if num_scales else None,
        recv_topk_idx=torch.empty(rows, num_topk, dtype=torch.int64, device=dev) if num_topk else None,
        recv_topk_weights=torch.empty(rows, num_topk, dtype=torch.float32, device=dev) if num_topk and has_weights else None,
        recv_src_idx=src_idx,
        recv_src_rank=src_rank,
        recv_counts=plan.recv_counts if with_src else torch.empty_like(plan.recv_counts),
        recv_expert_counts=plan.recv_expert_counts if with_src else None,
        padded=padded,
    )


def dispatch_send(
    buf: SymmetricBuffer,
    plan: RoutingPlan,
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    experts_per_rank: int,
    num_sms: int,
    stream: torch.cuda.Stream,
    cast_fp8: bool = False,
) -> None:
    """Write this rank's token records into every destination's region (x ``[T, H]``, FP8 with ``x_scales``).

    With ``cast_fp8``, ``x`` is bf16, fp16 or fp32 (and ``x_scales`` None): the kernel casts each row to FP8 e4m3
    with one scale per 128 channels as it sends it, bit-exact with :func:`moe_comm.fp8.per_token_cast_to_fp8`,
    so the records (and the receive side) are those of dispatching ``per_token_cast_fp8(x)``."""
    cast_dtype = _ext().NO_CAST
    if cast_fp8:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x_scales is not None:
            raise ValueError(f"x: the fused FP8 cast reads bf16, fp16 or fp32 rows without scales, got {x.dtype}"
                             f"{' with x_scales' if x_scales is not None else ''}")
        cast_dtype = dtype_code(x.dtype)
        row_bytes = row_bytes_of(x, torch.float8_e4m3fn)
        num_scales = num_scale_blocks(x.shape[1])
    else:
        row_bytes = row_bytes_of(x)
        num_scales = 0 if x_scales is None else x_scales.shape[1]
    if x.data_ptr() % 16:
        x = x.clone()
    num_topk = 0 if topk_idx is None else topk_idx.shape[1]
    record = dispatch_record_bytes(row_bytes, num_scales, num_topk)
    _ext().dispatch_send(
        buf.view("dispatch_send"), _ptr(x), _ptr(x_scales), _ptr(topk_idx), _ptr(topk_weights),
        _ptr(plan.is_token_in_rank), _ptr(plan.send_pos), plan.num_tokens_per_rank.data_ptr(), x.shape[0], row_bytes,
        num_scales, num_topk, experts_per_rank, buf.capacity_rows(record, "dispatch"), cast_dtype, num_sms,
        stream.cuda_stream,
    )


def dispatch_recv(
    buf: SymmetricBuffer, plan: RoutingPlan, out: DispatchOutputs, num_sms: int, stream: torch.cuda.Stream
) -> None:
    """Wait for every source's rows of this call and copy them into ``out`` in (source rank, token) order, then
    (``out.padded``) write the padding into the rows after them."""
    row_bytes = row_bytes_of(out.recv_x)
    num_scales = 0 if out.recv_scales is None else out.recv_scales.shape[1]
    num_topk = 0 if out.recv_topk_idx is None else out.recv_topk_idx.shape[1]
    record = dispatch_record_bytes(row_bytes, num_scales, num_topk)
    _ext().dispatch_recv(
        buf.view("dispatch_recv"), _ptr(out.recv_x), _ptr(out.recv_scales), _ptr(out.recv_topk_idx),
        _ptr(out.recv_topk_weights), _ptr(out.recv_src_idx), _ptr(out.recv_src_rank), out.recv_counts.data_ptr(),
        _ptr(out.recv_expert_counts), 0 if out.recv_expert_counts is None else out.recv_expert_counts.numel(),
        plan.num_recv_rows, row_bytes, num_scales, num_topk, buf.capacity_rows(record, "dispatch"), out.padded, num_sms,
        stream.cuda_stream,
    )


def combine_send(
    buf: SymmetricBuffer,
    plan: RoutingPlan,
    x: torch.Tensor,
    topk_weights: torch.Tensor | None,
    num_sms: int,
    stream: torch.cuda.Stream,
) -> None:
    """Return each received row ``x [N, H]`` (and its weights) to its token's rank."""
    row_bytes = row_bytes_of(x)
    if x.data_ptr() % 16:
        x = x.clone()
    num_topk = 0 if topk_weights is None else topk_weights.shape[1]
    record = combine_record_bytes(row_bytes, num_topk)
    _ext().combine_send(
        buf.view("combine_send"), _ptr(x), _ptr(topk_weights), plan.recv_counts.data_ptr(), row_bytes,
        num_topk, buf.capacity_rows(record, "combine"), num_sms, stream.cuda_stream,
    )


def combine_recv(
    buf: SymmetricBuffer,
    plan: RoutingPlan,
    out: torch.Tensor,
    out_weights: torch.Tensor | None,
    bias: tuple[torch.Tensor | None, torch.Tensor | None],
    num_sms: int,
    stream: torch.cuda.Stream,
) -> None:
    """Sum, per token and in rank order, the rows returned to this rank into ``out [T, H]`` (+ biases given in
    the accumulation dtype)."""
    row_bytes = row_bytes_of(out)
    num_topk = 0 if out_weights is None else out_weights.shape[1]
    record = combine_record_bytes(row_bytes, num_topk)
    _ext().combine_recv(
        buf.view("combine_recv"), _ptr(plan.is_token_in_rank), _ptr(plan.send_pos), _ptr(bias[0]),
        _ptr(bias[1]), _ptr(out), _ptr(out_weights), out.shape[0], out.shape[1], num_topk,
        buf.capacity_rows(record, "combine"), dtype_code(out.dtype), num_sms, stream.cuda_stream,
    )


def expert_major(
    rows: DispatchOutputs,
    recv_x: torch.Tensor,
    recv_scales: torch.Tensor | None,
    recv_count: torch.Tensor,
    src_token_idx: torch.Tensor,
    src_rank: torch.Tensor,
    layout_range: torch.Tensor,
    slot_of: torch.Tensor,
    num_sms: int,
    stream: torch.cuda.Stream,
) -> None:
    """Rearrange a padded dispatch's rows (``rows.recv_x [N, H]`` in source-rank, token order, local ids in
    ``rows.recv_topk_idx [N, K]``) expert-major, in one kernel of at most ``num_sms`` blocks:

    * ``recv_x [E, N, H]`` (and ``recv_scales [E, N, S]``): expert e's rows packed from slot 0, same order;
      slots from ``recv_count[e]`` on are left as they were;
    * ``recv_count [E]`` int32; ``src_token_idx`` / ``src_rank [E, N]`` int32, -1 past the count;
    * ``layout_range [E, R, 2]`` int32: (first slot, count) of each source rank's rows in expert e;
    * ``slot_of [N, K]`` int64: ``e * N + slot`` of row n in expert ``e = recv_topk_idx[n, k]``, -1 where that is -1.
    """
    assert rows.recv_topk_idx is not None and rows.recv_src_idx is not None and rows.recv_src_rank is not None
    n, k = rows.recv_topk_idx.shape
    experts = recv_x.shape[0]
    row_of = torch.empty(experts, n, dtype=torch.int32, device=recv_x.device)  # the kernel's slot -> row scratch
    _ext().expert_major(
        _ptr(rows.recv_x), _ptr(rows.recv_scales), _ptr(rows.recv_topk_idx), _ptr(rows.recv_src_idx),
        _ptr(rows.recv_src_rank), _ptr(recv_x), _ptr(recv_scales), recv_count.data_ptr(), _ptr(src_token_idx),
        _ptr(src_rank), layout_range.data_ptr(), _ptr(slot_of), _ptr(row_of), n, row_bytes_of(rows.recv_x),
        0 if rows.recv_scales is None else rows.recv_scales.shape[1], k, experts, layout_range.shape[1], num_sms,
        stream.cuda_stream,
    )


def low_latency_combine_send(
    buf: SymmetricBuffer,
    x: torch.Tensor,
    slot_of: torch.Tensor,
    rows: DispatchOutputs,
    max_tokens: int,
    num_sms: int,
    stream: torch.cuda.Stream,
) -> None:
    """Return every (received row, top-k choice) output row of ``x [E * N, H]`` (expert-major, as
    :func:`expert_major` laid the rows out; ``slot_of [N, K]`` names the row of each choice) to slot
    ``t * K + k`` of this rank's combine region on the token's rank (the combine family's send kernel)."""
    assert rows.recv_src_idx is not None and rows.recv_src_rank is not None
    if x.data_ptr() % 16:
        x = x.clone()
    n, k = slot_of.shape
    _ext().low_latency_combine_send(
        buf.view("low_latency_combine_send"), _ptr(x), _ptr(slot_of), _ptr(rows.recv_src_idx), _ptr(rows.recv_src_rank), n, k, max_tokens,
        row_bytes_of(x), num_sms, stream.cuda_stream,
    )


def low_latency_combine_recv(
    buf: SymmetricBuffer,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
    experts_per_rank: int,
    max_tokens: int,
    num_sms: int,
    stream: torch.cuda.Stream,
) -> None:
    """``out[t] = sum over k of topk_weights[t, k] * (the row returned for choice k)``, in k order, accumulated in
    float32 (float64 for float64) and rounded once; choices with ``topk_idx == -1`` add nothing."""
    if out.data_ptr() % 16:
        raise ValueError("out: the low-latency combine writes 16-byte vectors; pass a 16-byte aligned tensor")
    t, k = topk_idx.shape
    _ext().low_latency_combine_recv(
        buf.view("low_latency_combine_recv"), _ptr(topk_idx), _ptr(topk_weights), _ptr(out), t, k, out.shape[1], experts_per_rank, max_tokens,
        dtype_code(out.dtype), num_sms, stream.cuda_stream,
    )


def per_token_cast_fp8(x: torch.Tensor, num_sms: int = 132) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` bf16/fp16/fp32 -> ``(float8_e4m3fn [T, H], float32 [T, ceil(H/128)])`` on the device,
    bit-exact with :func:`moe_comm.fp8.per_token_cast_to_fp8`."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dim() != 2 or not x.is_cuda:
        raise ValueError(f"x: expected a [T, H] bf16/fp16/fp32 CUDA tensor, got {x.dtype} {list(x.shape)} on {x.device}")
    x = x.contiguous()
    t, h = x.shape
    out = torch.empty(t, h, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(t, (h + 127) // 128, dtype=torch.float32, device=x.device)
    _ext().per_token_cast_fp8(_ptr(x), dtype_code(x.dtype), t, h, _ptr(out), _ptr(scales), num_sms,
                              torch.cuda.current_stream(x.device).cuda_stream)
    return out, scales
