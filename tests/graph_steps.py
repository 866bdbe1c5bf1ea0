"""Decode-style steps for the CUDA-graph tests: one dispatch, a stand-in expert and one combine, each call free of
host synchronisation and reading and writing tensors that outlive the step, so a graph captured around a step
replays it on whatever values were last written into ``step.x``.

Used by tests/gpu/test_cuda_graphs.py (a real ``torch.cuda.CUDAGraph``) and by tests/cuda_model/checks.py (the
kernel model replays the launches a step made). Two steps: the low-latency pair (expert-major layout, weighted
combine into ``out=``) and the normal pair in worst-case form (``num_worst_tokens``, no host synchronisation).
"""

from __future__ import annotations

import torch

from moe_comm import Buffer

__all__ = ["GraphStep", "LowLatencyStep", "WorstCaseStep", "make_step"]


class GraphStep:
    """Dispatch, expert and combine of one rank over static tensors.

    Args:
        buf: the Buffer (its symmetric buffers must already be sized: run the step once before capturing).
        x: ``[T, H]`` bf16 inputs, copied into the static ``self.x``.
        topk_idx: ``[T, K]`` int64 global expert ids (-1 for none); the routing every replay reuses.
        topk_weights: ``[T, K]`` float32.
        num_experts: E, a multiple of the group size.
    """

    def __init__(self, buf: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> None:
        self.buf = buf
        self.x = x.clone()
        self.topk_idx = topk_idx.clone()
        self.topk_weights = topk_weights.to(torch.float32).clone()
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // buf.group_size
        self.first_expert = buf.rank * self.experts_per_rank

    def dispatch(self) -> None:
        raise NotImplementedError

    def expert(self) -> None:
        """Write the expert outputs into a static tensor (no allocation the replay would miss)."""
        raise NotImplementedError

    def combine(self) -> torch.Tensor:
        """The combined ``[T, H]`` rows."""
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        self.dispatch()
        self.expert()
        return self.combine()


class LowLatencyStep(GraphStep):
    """``low_latency_dispatch`` (bf16 or FP8), expert e multiplies its rows by ``e + 1`` (global id), then
    ``low_latency_combine`` weighted by ``topk_weights`` into the static ``self.out``."""

    def __init__(self, buf: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int, max_tokens: int, use_fp8: bool) -> None:
        super().__init__(buf, x, topk_idx, topk_weights, num_experts)
        self.max_tokens = max_tokens
        self.use_fp8 = use_fp8
        slots = buf.group_size * max_tokens
        self.y = torch.empty(self.experts_per_rank, slots, x.shape[1], dtype=torch.bfloat16, device=x.device)
        self.out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        first = self.first_expert
        self.factors = torch.arange(first + 1, first + self.experts_per_rank + 1, dtype=torch.float32,
                                    device=x.device).view(-1, 1, 1)

    def dispatch(self) -> None:
        self.res = self.buf.low_latency_dispatch(self.x, self.topk_idx, self.max_tokens, self.num_experts,
                                                 use_fp8=self.use_fp8)

    def expert(self) -> None:
        if self.use_fp8:
            data, scales = self.res.recv_x
            rows = data.float() * scales.repeat_interleave(128, dim=-1)[..., : data.shape[-1]]
        else:
            rows = self.res.recv_x.float()
        self.y.copy_(rows * self.factors)

    def combine(self) -> torch.Tensor:
        self.buf.low_latency_combine(self.y, self.topk_idx, self.topk_weights, self.res.handle, out=self.out)
        return self.out


class WorstCaseStep(GraphStep):
    """``dispatch`` with ``num_worst_tokens = R * T`` (and top-k weights), every received row times 2, then
    ``combine`` with the received weights."""

    def __init__(self, buf: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int, worst_tokens: int) -> None:
        super().__init__(buf, x, topk_idx, topk_weights, num_experts)
        self.worst_tokens = worst_tokens
        self.y = torch.empty(worst_tokens, x.shape[1], dtype=x.dtype, device=x.device)

    def dispatch(self) -> None:
        self.res = self.buf.dispatch(self.x, topk_idx=self.topk_idx, topk_weights=self.topk_weights,
                                     num_experts=self.num_experts, num_worst_tokens=self.worst_tokens)

    def expert(self) -> None:
        self.y.copy_(self.res.recv_x * 2)

    def combine(self) -> torch.Tensor:
        return self.buf.combine(self.y, self.res.handle, topk_weights=self.res.recv_topk_weights).combined_x


def make_step(kind: str, buf: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
              num_experts: int, max_tokens: int) -> GraphStep:
    """``kind``: "low_latency", "low_latency_fp8" or "worst_case"; ``max_tokens`` bounds every rank's T."""
    if kind.startswith("low_latency"):
        return LowLatencyStep(buf, x, topk_idx, topk_weights, num_experts, max_tokens, use_fp8=kind.endswith("fp8"))
    if kind == "worst_case":
        return WorstCaseStep(buf, x, topk_idx, topk_weights, num_experts, buf.group_size * max_tokens)
    raise ValueError(f"kind: unknown step {kind!r}")
