"""Low-latency mode of the portable backend: static shapes, for decode steps.

Dispatch all-gathers every rank's tokens (optionally cast to FP8), padded to M rows, with their top-k ids;
each rank then picks the rows of its local experts into the expert-major layout ``[E_local, R * M, H]``.
Combine gathers the gating weights the same way and sends each token owner, with one ``all_to_all``, a
float32 partial sum of this rank's experts' weighted outputs; the owner adds the R partial sums.

Legend: T tokens, H hidden, K top-k, R ranks, E experts, E_local = E / R, M max tokens per rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_comm import host_memory
from moe_comm.backends.base import BackendContext, LowLatencyDispatchOutput
from moe_comm.collectives import StepContext, all_gather_rows, all_to_all_rows, wait_all
from moe_comm.fp8 import FP8_DTYPE, per_token_cast_to_fp8
from moe_comm.layout import local_expert_ids
from moe_comm.types import LowLatencyHandle

__all__ = ["low_latency_combine", "low_latency_dispatch"]


def low_latency_dispatch(
    context: BackendContext,
    backend_name: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool,
    return_recv_hook: bool,
) -> LowLatencyDispatchOutput:
    """Dispatch ``x`` ``[T, H]`` (T <= M) to the ranks of its ``topk_idx`` ``[T, K]`` experts, expert-major.

    Returns ``recv_x`` ``[E_local, R * M, H]`` (float8_e4m3fn with ``use_fp8``, else ``x.dtype``; rows of one
    expert ordered by source rank, then token), ``recv_x_scales`` ``[E_local, R * M, H / 128]`` float32 or
    ``None``, ``recv_count`` ``[E_local]`` int32 and the handle. With ``return_recv_hook`` the receive side
    runs only when the returned hook is called.
    """
    ctx = StepContext(context.group, context.rank, "low_latency_dispatch", context.timeout_s)
    device = x.device
    world, rank = context.world_size, context.rank
    max_tokens = num_max_dispatch_tokens_per_rank
    num_tokens, hidden = x.shape
    num_topk = topk_idx.shape[1]
    experts_per_rank = num_experts // world
    slots = world * max_tokens

    if use_fp8:
        payload, scales = per_token_cast_to_fp8(x)
    else:
        payload, scales = x, None
    pad = max_tokens - num_tokens
    send_x = torch.nn.functional.pad(payload.view(torch.uint8), (0, 0, 0, pad)) if pad else payload.view(torch.uint8)
    send_idx = torch.nn.functional.pad(topk_idx, (0, 0, 0, pad), value=-1) if pad else topk_idx
    gathered_x = host_memory.empty(slots, send_x.shape[1], dtype=torch.uint8, device=device)
    gathered_idx = torch.empty(slots, num_topk, dtype=torch.int64, device=device)
    works = [all_gather_rows(ctx, gathered_x, send_x.contiguous()), all_gather_rows(ctx, gathered_idx, send_idx.contiguous())]
    gathered_scales = None
    if scales is not None:
        send_scales = torch.nn.functional.pad(scales, (0, 0, 0, pad)) if pad else scales
        gathered_scales = torch.empty(slots, scales.shape[1], dtype=torch.float32, device=device)
        works.append(all_gather_rows(ctx, gathered_scales, send_scales.contiguous()))

    out_dtype = FP8_DTYPE if use_fp8 else x.dtype
    recv_x = host_memory.empty(experts_per_rank, slots, hidden, dtype=out_dtype, device=device)
    recv_scales = (
        torch.empty(experts_per_rank, slots, scales.shape[1], dtype=torch.float32, device=device)
        if scales is not None
        else None
    )
    recv_count = torch.empty(experts_per_rank, dtype=torch.int32, device=device)
    src_token_idx = torch.empty(experts_per_rank, slots, dtype=torch.int32, device=device)
    src_rank = torch.empty(experts_per_rank, slots, dtype=torch.int32, device=device)
    layout_range = torch.empty(experts_per_rank, world, 2, dtype=torch.int32, device=device)
    # Filled by the receive: for each gathered row and top-k slot, where its expert's row landed.
    state = {
        "gathered_idx": gathered_idx,
        "slot_of": torch.empty(slots, num_topk, dtype=torch.int64, device=device),
    }
    handle = LowLatencyHandle(
        buffer_id=context.buffer_id,
        backend=backend_name,
        num_ranks=world,
        num_experts=num_experts,
        num_max_dispatch_tokens_per_rank=max_tokens,
        num_tokens=num_tokens,
        hidden=hidden,
        num_topk=num_topk,
        src_token_idx=src_token_idx,
        src_rank=src_rank,
        layout_range=layout_range,
        backend_state=state,
    )

    def receive() -> None:
        wait_all(ctx, works, "low-latency token all_gather")
        local = local_expert_ids(gathered_idx, rank, experts_per_rank)  # [R*M, K]
        hit = torch.zeros(slots, experts_per_rank + 1, dtype=torch.bool, device=device)
        hit.scatter_(1, local + 1, True)
        mask = hit[:, 1:].t().contiguous()  # [E_local, R*M]
        counts = mask.sum(dim=1)
        recv_count.copy_(counts)
        position = torch.cumsum(mask, dim=1) - 1  # slot of each gathered row within its expert
        perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [E_local, R*M]
        filled = torch.arange(slots, device=device).unsqueeze(0) < counts.unsqueeze(1)
        recv_x.view(experts_per_rank, slots, -1).view(torch.uint8).copy_(
            gathered_x.index_select(0, perm.flatten()).view(experts_per_rank, slots, -1)
        )
        if recv_scales is not None and gathered_scales is not None:
            recv_scales.copy_(gathered_scales.index_select(0, perm.flatten()).view(experts_per_rank, slots, -1))
        src_token_idx.copy_(torch.where(filled, perm % max_tokens, -1))
        src_rank.copy_(torch.where(filled, torch.div(perm, max_tokens, rounding_mode="floor"), -1))
        per_rank = mask.view(experts_per_rank, world, max_tokens).sum(dim=2)
        layout_range[:, :, 1].copy_(per_rank)
        layout_range[:, :, 0].copy_(torch.cumsum(per_rank, dim=1) - per_rank)
        # Flat index into recv_x [E_local * R * M] of (gathered row, top-k slot); -1 when not local.
        expert_for = local.clamp_min(0)
        flat = expert_for * slots + position.t().gather(1, expert_for)
        state["slot_of"].copy_(torch.where(local >= 0, flat, -1))

    hook = None
    if return_recv_hook:
        hook = receive
    else:
        receive()
    return LowLatencyDispatchOutput(
        recv_x=recv_x, recv_x_scales=recv_scales, recv_count=recv_count, handle=handle, hook=hook
    )

def low_latency_combine(
    context: BackendContext,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    return_recv_hook: bool,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """Return every expert row of ``x`` ``[E_local, R * M, H]`` to its token's rank, weighted and summed.

    Each token owner gets ``sum_k topk_weights[t, k] * row(t, k)`` over its choices, accumulated in float32 and
    cast to ``x.dtype`` in ``out`` (or a new ``[T, H]`` tensor). With ``return_recv_hook`` the sum is formed
    only when the returned hook is called. ``topk_idx`` is unused here: the dispatch handle knows the slots.
    """
    ctx = StepContext(context.group, context.rank, "low_latency_combine", context.timeout_s)
    device = x.device
    world = context.world_size
    max_tokens = handle.num_max_dispatch_tokens_per_rank
    num_tokens, hidden = handle.num_tokens, handle.hidden
    slots = world * max_tokens
    state = handle.backend_state
    pad = max_tokens - num_tokens
    send_w = torch.nn.functional.pad(topk_weights.float(), (0, 0, 0, pad)) if pad else topk_weights.float()
    gathered_w = torch.empty(slots, topk_weights.shape[1], dtype=torch.float32, device=device)
    wait_all(ctx, [all_gather_rows(ctx, gathered_w, send_w.contiguous())], "low-latency weight all_gather")

    # Weighted partial sum of this rank's experts for every (source rank, token), in top-k order.
    slot_of = state["slot_of"]  # [R*M, K]
    rows = x.reshape(-1, hidden)
    partial = host_memory.zeros(slots, hidden, dtype=torch.float32, device=device)
    for k in range(slot_of.shape[1]):
        hit = slot_of[:, k] >= 0
        picked = rows.index_select(0, slot_of[:, k].clamp_min(0)).float()
        weight = torch.where(hit, gathered_w[:, k], torch.zeros_like(gathered_w[:, k]))
        partial.addcmul_(picked, weight.unsqueeze(1))
    returned = host_memory.empty(slots, hidden, dtype=torch.float32, device=device)
    works = [all_to_all_rows(ctx, returned, partial, None, None)]
    combined = out if out is not None else host_memory.empty(num_tokens, hidden, dtype=x.dtype, device=device)

    def receive() -> None:
        wait_all(ctx, works, "low-latency partial-sum all_to_all")
        total = returned.view(world, max_tokens, hidden)[:, :num_tokens].sum(dim=0)
        combined.copy_(total)

    if return_recv_hook:
        return combined, receive
    receive()
    return combined, None
