"""Split-phase, differentiable dispatch and combine: start now, wait later, gradients flow through.

``start_dispatch`` / ``start_combine`` issue :meth:`Buffer.dispatch` / :meth:`Buffer.combine` with
``async_finish=True`` on detached tensors and return a pending object; its ``wait()`` completes the
communication and attaches the results to the autograd graph with a small Function whose backward is the
opposite collective (a combine for a dispatch, a cached dispatch for a combine), as in
:mod:`moe_comm.functional`. Between the start and the wait the caller may run any other computation
(shared experts, another micro-batch's layers).

Legend: T tokens, H hidden, K top-k, N received rows, E_local experts on this rank.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_comm.buffer import Buffer
from moe_comm.events import EventOverlap
from moe_comm.types import DispatchHandle

__all__ = ["Dispatched", "PendingCombine", "PendingDispatch", "start_combine", "start_dispatch"]


class _AttachDispatch(torch.autograd.Function):
    """Identity in forward on the already received rows; backward combines the rows' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, box: dict) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.box = box
        return box["recv_x"], box["recv_w"]

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor | None, grad_recv_w: torch.Tensor | None) -> tuple[Any, ...]:
        box = ctx.box
        handle: DispatchHandle = box["handle"]
        recv_idx = box["recv_idx"]
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_tokens, handle.hidden, dtype=box["recv_x"].dtype, device=recv_idx.device)
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
        # Received weights of experts held elsewhere are zeros, not this rank's to differentiate.
        grad_w = torch.where(recv_idx >= 0, grad_recv_w.float(), torch.zeros((), dtype=torch.float32, device=recv_idx.device))
        result = box["buffer"].combine(grad_recv_x.contiguous(), handle, topk_weights=grad_w.contiguous())
        return result.combined_x, result.combined_topk_weights.to(box["weights_dtype"]), None


class _AttachCombine(torch.autograd.Function):
    """Identity in forward on the combined rows; backward sends each token's gradient back (cached dispatch)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, box: dict) -> torch.Tensor:  # type: ignore[override]
        ctx.box = box
        return box["combined"]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        box = ctx.box
        result = box["buffer"].dispatch(grad.contiguous(), handle=box["handle"])
        return result.recv_x, None


class Dispatched:
    """The rows this rank received, attached to autograd.

    Attributes:
        recv_x: ``[N, H]`` rows, by source rank then source token.
        recv_topk_idx: ``[N, K]`` int64 local expert ids, -1 for experts on other ranks.
        recv_topk_weights: ``[N, K]`` float32 (in the caller's weight dtype) gating weights.
        handle: the :class:`DispatchHandle` (for the combine).
        num_recv_tokens_per_expert: ``[E_local]`` int64, selections per local expert.
    """

    __slots__ = ("recv_x", "recv_topk_idx", "recv_topk_weights", "handle", "num_recv_tokens_per_expert")

    def __init__(self, recv_x: torch.Tensor, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor, handle: DispatchHandle, counts: torch.Tensor) -> None:
        self.recv_x = recv_x
        self.recv_topk_idx = recv_topk_idx
        self.recv_topk_weights = recv_topk_weights
        self.handle = handle
        self.num_recv_tokens_per_expert = counts


class PendingDispatch:
    """A dispatch in flight; :meth:`wait` returns the :class:`Dispatched` rows (call it exactly once)."""

    def __init__(self, box: dict, x: torch.Tensor, topk_weights: torch.Tensor, event: EventOverlap | None, num_local_experts: int) -> None:
        self._box = box
        self._x = x
        self._w = topk_weights
        self.event = event
        self._num_local_experts = num_local_experts
        self._result: Dispatched | None = None

    def wait(self) -> Dispatched:
        if self._result is not None:
            return self._result
        if self.event is not None:
            self.event.current_stream_wait()
        box = self._box
        recv_idx = box["recv_idx"]
        local = recv_idx[recv_idx >= 0]
        counts = torch.bincount(local, minlength=self._num_local_experts)
        if self._x.requires_grad or self._w.requires_grad:
            recv_x, recv_w = _AttachDispatch.apply(self._x, self._w, box)
        else:
            recv_x, recv_w = box["recv_x"], box["recv_w"]
        self._result = Dispatched(recv_x, recv_idx, recv_w, box["handle"], counts)
        self._x = self._w = None  # type: ignore[assignment]
        return self._result


class PendingCombine:
    """A combine in flight; :meth:`wait` returns ``combined [T, H]`` (call it once)."""

    def __init__(self, box: dict, x: torch.Tensor, event: EventOverlap | None) -> None:
        self._box = box
        self._x = x
        self.event = event
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is not None:
            return self._result
        if self.event is not None:
            self.event.current_stream_wait()
        if self._x.requires_grad:
            self._result = _AttachCombine.apply(self._x, self._box)
        else:
            self._result = self._box["combined"]
        self._x = None  # type: ignore[assignment]
        return self._result


def start_dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> PendingDispatch:
    """Start a differentiable dispatch of ``x [T, H]`` by ``topk_idx [T, K]`` int64 with ``topk_weights [T, K]``.

    Collective: every rank of the buffer's group calls it in the same order.
    """
    weights32 = topk_weights.detach().float().contiguous()
    result = buffer.dispatch(
        x.detach().contiguous(), topk_idx=topk_idx.contiguous(), topk_weights=weights32, num_experts=num_experts, async_finish=True
    )
    assert isinstance(result.recv_x, torch.Tensor)
    box = {
        "buffer": buffer,
        "handle": result.handle,
        "recv_x": result.recv_x,
        "recv_idx": result.recv_topk_idx,
        "recv_w": result.recv_topk_weights,
        "weights_dtype": topk_weights.dtype,
    }
    return PendingDispatch(box, x, topk_weights, result.event, num_experts // buffer.group_size)


def start_combine(buffer: Buffer, x: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
    """Start a differentiable combine of expert outputs ``x [N, H]`` (rows as dispatched) back to their tokens."""
    result = buffer.combine(x.detach().contiguous(), handle, async_finish=True)
    box = {"buffer": buffer, "handle": handle, "combined": result.combined_x}
    return PendingCombine(box, x, result.event)
