"""Differentiable dispatch and combine.

The backward of a dispatch is a combine of the received rows' gradients (each token's gradient is the
sum over the ranks it went to); the backward of a combine is a cached dispatch of the combined
gradient (every row receives its token's gradient). Both are collectives, so every rank must run the
backward pass of the same calls, as in any data-parallel program.

Legend: T tokens, H hidden, K top-k, N received rows.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_comm.buffer import Buffer
from moe_comm.types import DispatchHandle

__all__ = ["combine", "dispatch"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        buffer: Buffer,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        num_experts: int,
        expert_alignment: int,
    ) -> tuple[Any, ...]:
        result = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, expert_alignment=expert_alignment
        )
        assert isinstance(result.recv_x, torch.Tensor)
        ctx.buffer = buffer
        ctx.handle = result.handle
        ctx.has_weights = topk_weights is not None
        recv_topk_idx = result.recv_topk_idx
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        return result.recv_x, recv_topk_idx, result.recv_topk_weights, result.handle, result.num_recv_tokens_per_expert_list

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor | None, _grad_idx: Any, grad_recv_w: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
        (recv_topk_idx,) = ctx.saved_tensors
        handle: DispatchHandle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_tokens, handle.hidden, dtype=torch.float32, device=recv_topk_idx.device)
        weights_grad = None
        if ctx.has_weights:
            if grad_recv_w is None:
                grad_recv_w = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
            # Received weights of experts on other ranks are constant zeros: no gradient flows through them.
            weights_grad = torch.where(recv_topk_idx >= 0, grad_recv_w.float(), torch.zeros_like(grad_recv_w, dtype=torch.float32))
        result = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=weights_grad)
        return None, result.combined_x, None, result.combined_topk_weights, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, buffer: Buffer, x: torch.Tensor, handle: DispatchHandle, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.buffer = buffer
        ctx.handle = handle
        ctx.has_bias = bias is not None
        return buffer.combine(x, handle, bias=bias).combined_x

    @staticmethod
    def backward(ctx: Any, grad_combined: torch.Tensor) -> tuple[Any, ...]:
        result = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)
        return None, result.recv_x, None, grad_combined if ctx.has_bias else None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    num_experts: int | None = None,
    expert_alignment: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, DispatchHandle, list[int]]:
    """Differentiable :meth:`Buffer.dispatch` (normal mode, no FP8).

    Args:
        buffer: the :class:`Buffer`.
        x: ``[T, H]`` float tensor (gradients flow to it).
        topk_idx: ``[T, K]`` int64 global expert ids, -1 for none.
        topk_weights: ``[T, K]`` float32 (gradients flow to it), or ``None``.
        num_experts: E (defaults to the Buffer's).
        expert_alignment: as in :meth:`Buffer.dispatch`.

    Returns:
        ``(recv_x [N, H], recv_topk_idx [N, K], recv_topk_weights [N, K] or None, handle,
        num_recv_tokens_per_expert_list)``.
    """
    experts = num_experts if num_experts is not None else buffer.num_experts
    if experts is None:
        raise ValueError("num_experts: pass num_experts= or create the Buffer with num_experts=")
    recv_x, recv_idx, recv_w, handle, counts = _Dispatch.apply(buffer, x, topk_idx, topk_weights, experts, expert_alignment)
    return recv_x, recv_idx, recv_w, handle, counts


def combine(buffer: Buffer, x: torch.Tensor, handle: DispatchHandle, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable :meth:`Buffer.combine`: ``x [N, H]`` -> ``combined [T, H]`` (gradients flow to ``x`` and ``bias``)."""
    return _Combine.apply(buffer, x, handle, bias)
