"""Expert parallelism for Hugging Face ``transformers`` MoE models: :func:`shard_moe_experts`.

Supported: every model whose sparse blocks keep their experts in a fused ``*Experts`` module (transformers
>= 5: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the other families built the same way), i.e.
a module with 3-D parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, an ``act_fn``, and
``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``.

Only the experts module is replaced (plus, for blocks with shared experts, the block's forward, by one
that computes them while the dispatch is in flight with the same arithmetic). The block's router
(softmax or sigmoid, group-limited top-k, normalisation, scaling factor, score-correction bias) and
shared experts with their gates run unchanged, so routing is the original math by construction; only
where each expert runs changes.

Legend: T tokens on this rank, H hidden, I expert intermediate size, K top-k, N rows received,
E experts, E_local = E / R.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from moe_comm.buffer import Buffer
from moe_comm.nn._ops import start_combine, start_dispatch
from moe_comm.nn.moe import expert_permutation

__all__ = ["ExpertParallelExperts", "shard_moe_experts"]


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3
        and hasattr(module, "act_fn") and not isinstance(module, ExpertParallelExperts)
    )


class ExpertParallelExperts(nn.Module):
    """This rank's share of a fused ``*Experts`` module, with the same call signature.

    Attributes:
        gate_up_proj: ``[E_local, 2I, H]``, experts ``expert_offset .. expert_offset + E_local - 1`` of the original.
        down_proj: ``[E_local, H, I]``.
        expert_offset: global id of local expert 0 (``rank * E_local``).
    """

    def __init__(self, original: nn.Module, buffer: Buffer) -> None:
        super().__init__()
        num_experts = original.gate_up_proj.shape[0]
        world, rank = buffer.group_size, buffer.rank
        if num_experts % world:
            raise ValueError(f"{type(original).__name__}: {num_experts} experts cannot be split over {world} ranks; use an expert-parallel group whose size divides {num_experts}")
        local = num_experts // world
        self.num_experts = num_experts
        self.num_local_experts = local
        self.expert_offset = rank * local
        sl = slice(self.expert_offset, self.expert_offset + local)
        self.gate_up_proj = nn.Parameter(original.gate_up_proj.detach()[sl].clone(), requires_grad=original.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(original.down_proj.detach()[sl].clone(), requires_grad=original.down_proj.requires_grad)
        self.act_fn = original.act_fn
        self.original_class = type(original).__name__
        self.buffer = buffer

    def extra_repr(self) -> str:
        return f"{self.original_class}: experts {self.expert_offset}..{self.expert_offset + self.num_local_experts - 1} of {self.num_experts}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` -> ``[T, H]``: the weighted sum of each token's top-k experts, wherever they live."""
        return self.finish(self.start(hidden_states, top_k_index, top_k_weights))

    def start(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple:
        """Start the dispatch; other work may run before :meth:`finish`."""
        pending = start_dispatch(self.buffer, hidden_states, top_k_index.long(), top_k_weights, self.num_experts)
        return pending, top_k_weights.dtype

    def finish(self, started: tuple) -> torch.Tensor:
        """Wait for the dispatch, run the local experts, combine; returns ``[T, H]``."""
        pending, weights_dtype = started
        got = pending.wait()
        rows, slots, _, counts = expert_permutation(got.recv_topk_idx, self.num_local_experts)
        out_NH = torch.zeros_like(got.recv_x)
        start = 0
        for e, count in enumerate(counts.tolist()):
            # Every expert runs (even on zero rows) so each rank's graph holds all its parameters.
            r = rows[start : start + count]
            gate, up = nn.functional.linear(got.recv_x[r], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            h = h * got.recv_topk_weights[r, slots[start : start + count], None].to(weights_dtype)
            out_NH = out_NH.index_add(0, r, h.to(out_NH.dtype))
            start += count
        return start_combine(self.buffer, out_NH, got.handle).wait()


def _qwen2_moe_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE block forward with the shared expert computed while the dispatch is in flight (same math)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    _, routing_weights, selected_experts = self.gate(flat)
    started = self.experts.start(flat, selected_experts, routing_weights)
    shared = self.shared_expert(flat)
    expert_output = self.experts.finish(started)
    shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
    return (expert_output + shared).reshape(batch_size, sequence_length, hidden_dim)


def _deepseek_v3_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 MoE forward with the shared experts computed while the dispatch is in flight (same math)."""
    residuals = hidden_states
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = self.gate(hidden_states)
    started = self.experts.start(hidden_states.view(-1, hidden_states.shape[-1]), topk_indices, topk_weights)
    shared = self.shared_experts(residuals)
    return self.experts.finish(started).view(*orig_shape) + shared


def _overlapped_forward(block: nn.Module):
    """The shared-expert-overlapping forward for a known block layout, or ``None`` to keep the block's own."""
    if not isinstance(getattr(block, "experts", None), ExpertParallelExperts) or not hasattr(block, "gate"):
        return None
    if hasattr(block, "shared_expert") and hasattr(block, "shared_expert_gate"):
        return _qwen2_moe_forward
    if hasattr(block, "shared_experts") and type(block).__name__.startswith("DeepseekV3"):
        return _deepseek_v3_forward
    return None


def shard_moe_experts(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    backend: str = "auto",
    buffer: Buffer | None = None,
    overlap_shared_experts: bool = True,
) -> nn.Module:
    """Keep on each rank only its share of every MoE layer's experts and run them expert-parallel.

    Call it with the same (identically initialised or loaded) model on every rank of ``group``. Expert
    ``e`` of each layer stays on rank ``e // E_local``; the other experts' weights are dropped. Each rank then
    feeds its own tokens; every rank must run the same forward and backward calls (one collective per MoE
    layer each way). Non-expert parameters are untouched (replicated: average their gradients over the
    group as in data parallelism).

    Args:
        model: a ``transformers`` model (or any module) containing fused ``*Experts`` modules.
        group: the expert-parallel process group (default: the world).
        backend: the :class:`moe_comm.Buffer` backend (``"auto"``, ``"torch"``, ``"cuda"``).
        buffer: an existing Buffer to use instead of making one.
        overlap_shared_experts: for blocks with shared experts (Qwen2-MoE, DeepSeek-V3), compute them while
            the dispatch is in flight (the block's forward is replaced by one with the same arithmetic).

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: no supported experts module was found, or the expert count does not divide the group size.
    """
    targets = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    if not targets:
        raise ValueError(
            f"model: no fused MoE experts module (3-D gate_up_proj/down_proj) found in {type(model).__name__}; "
            "shard_moe_experts supports transformers >= 5 MoE families (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...)"
        )
    if buffer is None:
        buffer = Buffer(group, backend=backend)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelExperts(module, buffer))
        forward = _overlapped_forward(parent) if overlap_shared_experts else None
        if forward is not None:
            parent.forward = types.MethodType(forward, parent)
    return model
