"""The contract between :class:`moe_comm.Buffer` and a backend that moves the tokens.

The Buffer front end owns everything that is the same for every backend: argument checking (local
and across ranks), computing the layout when the caller omits it, FP8 tuple handling, streams,
``previous_event``/``async_finish`` and building the typed results. A backend only moves data and
returns exactly the semantics documented on :class:`moe_comm.types.DispatchResult` and friends; the
portable ``torch`` backend is the semantic reference every other backend is tested against.

Shape legend: T tokens, H hidden, K top-k, R ranks, E experts, E_local = E / R, N received rows,
M = max dispatch tokens per rank (low-latency mode).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from moe_comm.types import DispatchHandle, LowLatencyHandle

__all__ = [
    "BackendContext",
    "CombineOutput",
    "CombineRequest",
    "CommBackend",
    "DispatchOutput",
    "DispatchRequest",
    "LowLatencyDispatchOutput",
]


@dataclass(frozen=True, kw_only=True)
class BackendContext:
    """What a backend knows about its Buffer.

    Attributes:
        group: the process group (never ``None``; the default group is resolved by the Buffer).
        rank: this process's rank in ``group``.
        world_size: R.
        buffer_id: identity stamped into every handle.
        timeout_s: bound on every wait.
        num_sms: default SM budget of the CUDA kernels.
        device: where this rank's tensors live.
        options: backend-specific keyword arguments given to the Buffer (for example buffer sizes).
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    buffer_id: int
    timeout_s: float
    num_sms: int
    device: torch.device
    options: dict


@dataclass(frozen=True, kw_only=True)
class DispatchRequest:
    """A checked dispatch: every tensor is contiguous, on the Buffer's device, with consistent shapes.

    Attributes:
        x: ``[T, H]`` payload (bf16, fp16, fp32, fp64, or float8_e4m3fn when ``x_scales`` is set).
        x_scales: ``[T, H/128]`` float32 FP8 scales, or ``None``.
        topk_idx: ``[T, K]`` int64 global expert ids (-1 = none), or ``None`` (cached dispatch, or no top-k).
        topk_weights: ``[T, K]`` float32, or ``None``.
        num_tokens_per_rank: ``[R]`` int32 (``None`` for cached dispatch).
        is_token_in_rank: ``[T, R]`` bool (``None`` for cached dispatch).
        num_tokens_per_expert: ``[E]`` int32 (``None`` for cached dispatch).
        num_experts: E.
        expert_alignment: per-expert received counts are padded to a multiple of this.
        num_worst_tokens: 0, or the fixed row count of the outputs (no host synchronisation).
        handle: a previous handle for a cached dispatch, else ``None``.
        num_sms: SM budget for this call.
        rank_matrix: ``[R, R]`` int64 on the host, entry ``[i, j]`` = rows rank i sends to rank j, when the
            Buffer's agreement step already gathered every rank's ``num_tokens_per_rank``; else ``None`` and
            the backend exchanges counts itself.
        async_finish: whether the caller completes the dispatch later; then everything returned at once
            (``num_recv_tokens_per_expert_list``) must be known before the payload arrives.
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    num_tokens_per_rank: torch.Tensor | None
    is_token_in_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor | None
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    handle: DispatchHandle | None
    num_sms: int
    rank_matrix: torch.Tensor | None = None
    async_finish: bool = False


@dataclass(frozen=True, kw_only=True)
class DispatchOutput:
    """What a backend returns from a dispatch; the Buffer wraps it into a ``DispatchResult``.

    Attributes:
        recv_x: ``[N, H]`` in ``x``'s dtype.
        recv_x_scales: ``[N, H/128]`` float32 when the request carried scales, else ``None``.
        recv_topk_idx: ``[N, K]`` int64 local ids or ``None`` (cached / no top-k).
        recv_topk_weights: ``[N, K]`` float32 or ``None``.
        handle: the new handle (or the given one, for a cached dispatch).
        finish: completes the operation (waits for the transfer and fills the outputs in place); the
            Buffer calls it at once, or from the returned event when ``async_finish`` was asked. ``None``
            when the outputs are already complete.
    """

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    handle: DispatchHandle
    finish: Callable[[], None] | None = None


@dataclass(frozen=True, kw_only=True)
class CombineOutput:
    """What a backend returns from a combine.

    Attributes:
        combined_x: ``[T, H]``.
        combined_topk_weights: ``[T, K]`` float32 or ``None``.
        finish: as in :class:`DispatchOutput`.
    """

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None
    finish: Callable[[], None] | None = None


@dataclass(frozen=True, kw_only=True)
class CombineRequest:
    """A checked combine.

    Attributes:
        x: ``[N, H]`` rows in the handle's receive order (bf16, fp16, fp32 or fp64).
        handle: the dispatch's handle.
        topk_weights: ``[N, K]`` float32 to be summed like ``x``, or ``None``.
        bias: up to two ``[T, H]`` tensors added to the result (``None`` entries are skipped).
        num_sms: SM budget for this call.
    """

    x: torch.Tensor
    handle: DispatchHandle
    topk_weights: torch.Tensor | None
    bias: tuple[torch.Tensor | None, torch.Tensor | None]
    num_sms: int


@dataclass(frozen=True, kw_only=True)
class LowLatencyDispatchOutput:
    """What a backend returns from a low-latency dispatch.

    Attributes:
        recv_x: ``[E_local, R*M, H]`` bf16 or float8_e4m3fn.
        recv_x_scales: ``[E_local, R*M, H/128]`` float32 with FP8, else ``None``.
        recv_count: ``[E_local]`` int32.
        handle: the new handle.
        hook: completes the receive when ``return_recv_hook`` was asked, else ``None``.
    """

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    hook: Callable[[], None] | None


class CommBackend(abc.ABC):
    """A way of moving tokens. Subclasses set ``name`` and implement every abstract method.

    All methods are called on every rank of the group in the same order (they are collectives) with
    arguments the Buffer has already checked. ``available()`` says whether the backend can run here.
    """

    name: ClassVar[str]

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Return ``(usable, reason)``: whether this backend can run in this process, and why not."""

    @abc.abstractmethod
    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``topk_idx [T, K]`` -> ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool)``. Local computation, no communication."""

    @abc.abstractmethod
    def dispatch(self, request: DispatchRequest) -> DispatchOutput:
        """Send each token once to every rank that holds one of its experts (see ``DispatchResult``)."""

    @abc.abstractmethod
    def combine(self, request: CombineRequest) -> CombineOutput:
        """Sum each token's rows from every rank it went to (see ``CombineResult``)."""

    @abc.abstractmethod
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        return_recv_hook: bool,
    ) -> LowLatencyDispatchOutput:
        """``x [T, H]`` bf16, ``topk_idx [T, K]`` -> expert-major padded receive (see ``LowLatencyDispatchResult``)."""

    @abc.abstractmethod
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        return_recv_hook: bool,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """``x [E_local, R*M, H]`` -> ``(combined_x [T, H], hook or None)``, weighted by ``topk_weights``."""

    def comm_stream(self) -> torch.cuda.Stream | None:
        """The stream the backend's work runs on, or ``None`` when it has none (CPU, or collectives)."""
        return None

    def raise_if_failed(self) -> None:  # noqa: B027 - optional hook
        """Raise an error the backend's device work recorded (no synchronisation); a no-op where none can be."""

    def destroy(self) -> None:  # noqa: B027 - optional hook
        """Release resources (device buffers, IPC mappings). Idempotent."""
