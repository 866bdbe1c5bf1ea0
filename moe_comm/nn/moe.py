"""Expert-parallel MoE layer on top of :class:`moe_comm.Buffer`.

Legend: T tokens on this rank, H hidden, F expert intermediate size, K top-k, N rows received,
E experts in total, E_local = E / R experts per rank (global expert ``e`` lives on rank ``e // E_local``),
P (row, expert) pairs received, C the largest per-expert count.

One forward is three phases, each usable on its own so a scheduler can interleave micro-batches::

    pending = moe.dispatch_async(x_TH, topk_idx_TK, topk_weights_TK)   # communication starts
    ...                                                                # other work (shared experts, another micro-batch)
    dispatched = pending.wait()
    y_NH = moe.compute_experts(dispatched)                             # local experts, weights applied
    pending_out = moe.combine_async(dispatched, y_NH)                  # communication starts
    ...
    out_TH = pending_out.wait()

``forward`` does exactly this and runs the shared experts (if any) while the dispatch is in flight.
Everything is differentiable; every rank of the group must run the same forward and backward calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe_comm.buffer import Buffer
from moe_comm.nn._ops import Dispatched, PendingCombine, PendingDispatch, start_combine, start_dispatch

__all__ = ["ExpertParallelMoE", "GroupedExperts", "expert_permutation", "run_experts"]


def expert_permutation(recv_topk_idx_NK: torch.Tensor, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the received (row, expert) pairs by local expert.

    Args:
        recv_topk_idx_NK: ``[N, K]`` int64 local expert ids, -1 for none.
        num_local_experts: E_local.

    Returns:
        ``(rows_P, slots_P, experts_P, counts_E)``: for each pair in expert-major (then row) order its row,
        its top-k slot and its local expert; ``counts_E`` int64 ``[E_local]`` pairs per expert.
    """
    rows, slots = (recv_topk_idx_NK >= 0).nonzero(as_tuple=True)
    experts = recv_topk_idx_NK[rows, slots]
    order = torch.argsort(experts, stable=True)
    rows, slots, experts = rows[order], slots[order], experts[order]
    counts = torch.bincount(experts, minlength=num_local_experts)
    return rows, slots, experts, counts


class GroupedExperts(nn.Module):
    """E_local identical MLP experts stored as 3-D parameters and run as batched matmuls.

    ``gated=True`` is the SwiGLU expert ``w2(act(x w1) * (x w3))`` of Mixtral/Qwen/DeepSeek; ``False`` is
    ``w2(act(x w1))``. Weights: ``w1``/``w3`` ``[E_local, H, F]``, ``w2`` ``[E_local, F, H]``.
    """

    def __init__(self, num_local_experts: int, hidden: int, intermediate: int, *, gated: bool = True,
                 activation: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden, intermediate, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, intermediate, hidden, **kw))
        self.w3 = nn.Parameter(torch.empty(num_local_experts, hidden, intermediate, **kw)) if gated else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(w, std=w.shape[1] ** -0.5)

    def expert_forward(self, e: int, x_CH: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x_CH [C, H]`` (reference path)."""
        h = self.activation(x_CH @ self.w1[e])
        if self.w3 is not None:
            h = h * (x_CH @ self.w3[e])
        return h @ self.w2[e]

    def forward(self, x_PH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run all experts on ``x_PH [P, H]`` grouped expert-major with ``counts_E [E_local]`` rows each.

        Rows are scattered into a padded ``[E_local, C, H]`` block, multiplied with ``torch.bmm`` and
        gathered back, so the cost is one batched matmul per weight whatever the routing.
        """
        num_pairs, hidden = x_PH.shape
        if num_pairs == 0:
            # Keep every weight in the graph (zero gradients) so ranks that received nothing still backprop.
            anchor = sum(w.sum() for w in (self.w1, self.w2, self.w3) if w is not None)
            return x_PH.new_zeros(0, self.w2.shape[2]) + 0 * anchor
        counts = counts_E.to(x_PH.device)
        starts = torch.cumsum(counts, 0) - counts
        experts = torch.repeat_interleave(torch.arange(self.num_local_experts, device=x_PH.device), counts)
        pos = torch.arange(num_pairs, device=x_PH.device) - starts[experts]
        cap = int(counts.max())
        padded = x_PH.new_zeros(self.num_local_experts, cap, hidden)
        padded = padded.index_put((experts, pos), x_PH)
        h = self.activation(torch.bmm(padded, self.w1))
        if self.w3 is not None:
            h = h * torch.bmm(padded, self.w3)
        out = torch.bmm(h, self.w2)
        return out[experts, pos]


def run_experts(experts: nn.Module | Sequence[nn.Module], x_PH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Run local experts on pairs grouped expert-major: a :class:`GroupedExperts` (batched) or a list of modules."""
    if isinstance(experts, GroupedExperts):
        return experts(x_PH, counts_E)
    outs = []
    for e, chunk in enumerate(torch.split(x_PH, counts_E.tolist())):
        # Every expert runs even on zero rows so all parameters take part in the graph on every rank.
        outs.append(experts[e](chunk))
    return torch.cat(outs) if outs else x_PH


class ExpertParallelMoE(nn.Module):
    """Routed experts spread over a process group; the router stays with the caller.

    Args:
        experts: this rank's E_local experts: a :class:`GroupedExperts` or a sequence of modules mapping
            ``[C, H] -> [C, H]`` (global expert ``rank * E_local + i`` is ``experts[i]``).
        num_experts: E over the whole group (a multiple of the group size).
        buffer: the :class:`Buffer` to communicate through; made on ``group`` with ``backend`` if ``None``.
        group: the expert-parallel process group (default: the world).
        shared_experts: optional module ``[T, H] -> [T, H]`` added to the output, computed while the
            dispatch is in flight.
        backend: the Buffer backend when ``buffer`` is ``None``.
    """

    def __init__(self, experts: nn.Module | Sequence[nn.Module], num_experts: int, *, buffer: Buffer | None = None,
                 group: dist.ProcessGroup | None = None, shared_experts: nn.Module | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.buffer = buffer if buffer is not None else Buffer(group, backend=backend, num_experts=num_experts)
        world = self.buffer.group_size
        if num_experts % world:
            raise ValueError(f"num_experts: {num_experts} experts cannot be split over {world} ranks; use a multiple of {world}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // world
        self.experts = experts if isinstance(experts, nn.Module) else nn.ModuleList(experts)
        got = experts.num_local_experts if isinstance(experts, GroupedExperts) else len(self.experts)
        if got != self.num_local_experts:
            raise ValueError(f"experts: expected {self.num_local_experts} local experts ({num_experts} over {world} ranks), got {got}")
        self.shared_experts = shared_experts

    def dispatch_async(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> PendingDispatch:
        """Start sending tokens to their experts' ranks; ``.wait()`` on the result gives a :class:`Dispatched`.

        Args:
            x_TH: ``[T, H]`` activations. topk_idx_TK: ``[T, K]`` int64 global ids, -1 for none.
            topk_weights_TK: ``[T, K]`` gating weights (any float dtype; sent as float32).
        """
        return start_dispatch(self.buffer, x_TH, topk_idx_TK, topk_weights_TK, self.num_experts)

    def compute_experts(self, dispatched: Dispatched) -> torch.Tensor:
        """Run the local experts on the received rows; returns ``[N, H]``: per row the weighted sum of its experts' outputs."""
        recv_x = dispatched.recv_x
        rows, slots, _, counts = expert_permutation(dispatched.recv_topk_idx, self.num_local_experts)
        out_PH = run_experts(self.experts, recv_x[rows], counts)
        weights_P = dispatched.recv_topk_weights[rows, slots].to(out_PH.dtype)
        out_NH = torch.zeros(recv_x.shape[0], out_PH.shape[1], dtype=out_PH.dtype, device=out_PH.device)
        return out_NH.index_add(0, rows, out_PH * weights_P[:, None])

    def combine_async(self, dispatched: Dispatched, out_NH: torch.Tensor) -> PendingCombine:
        """Start returning ``out_NH`` to the tokens' ranks; ``.wait()`` gives ``[T, H]``."""
        return start_combine(self.buffer, out_NH, dispatched.handle)

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]``: sum over k of ``w_k * expert_{idx_k}(x)`` (+ shared experts)."""
        pending = self.dispatch_async(x_TH, topk_idx_TK, topk_weights_TK)
        shared = self.shared_experts(x_TH) if self.shared_experts is not None else None
        dispatched = pending.wait()
        out = self.combine_async(dispatched, self.compute_experts(dispatched)).wait()
        return out if shared is None else out + shared
