"""Routing layout in plain PyTorch: which rank and expert each token goes to. No communication.

Legend: T tokens, K top-k, R ranks, E experts, E_local = E / R. Expert ``e`` lives on rank ``e // E_local``.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dispatch_layout", "local_expert_ids", "pad_to_alignment", "rank_of_expert"]


def rank_of_expert(topk_idx_TK: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``[T, K]`` int64 rank that owns each selected expert, -1 where ``topk_idx`` is -1."""
    experts_per_rank = num_experts // num_ranks
    return torch.where(topk_idx_TK >= 0, torch.div(topk_idx_TK, experts_per_rank, rounding_mode="floor"), -1)


def compute_dispatch_layout(
    topk_idx_TK: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count where tokens go.

    Args:
        topk_idx_TK: ``[T, K]`` int64 global expert ids, -1 for no expert.
        num_experts: E, divisible by ``num_ranks``.
        num_ranks: R.

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``.
        A token counts once per rank however many of its experts live there.
    """
    num_tokens = topk_idx_TK.shape[0]
    device = topk_idx_TK.device
    valid = topk_idx_TK >= 0
    num_tokens_per_expert = torch.bincount(topk_idx_TK[valid], minlength=num_experts).to(torch.int32)
    # Column 0 collects the -1 entries so that scatter never needs a mask.
    in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)
    in_rank.scatter_(1, rank_of_expert(topk_idx_TK, num_experts, num_ranks) + 1, True)
    is_token_in_rank = in_rank[:, 1:].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def local_expert_ids(topk_idx: torch.Tensor, rank: int, experts_per_rank: int) -> torch.Tensor:
    """Global ids -> ids local to ``rank`` (``e - rank * E_local``), -1 for experts elsewhere or -1."""
    local = topk_idx - rank * experts_per_rank
    keep = (topk_idx >= 0) & (local >= 0) & (local < experts_per_rank)
    return torch.where(keep, local, torch.full_like(local, -1))


def pad_to_alignment(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    """Round every count up to a multiple of ``alignment``."""
    if alignment <= 1:
        return counts
    return (counts + alignment - 1) // alignment * alignment
