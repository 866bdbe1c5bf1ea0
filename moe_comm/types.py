"""Typed results, handles and configuration of :class:`moe_comm.Buffer`.

Shape legend used across the package: T tokens on this rank, H hidden size, K top-k, R ranks in the
group, E experts in total, E_local = E / R experts per rank, N rows received by this rank,
M = ``num_max_dispatch_tokens_per_rank`` (low-latency mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from moe_comm.events import EventOverlap

__all__ = [
    "CombineResult",
    "Config",
    "DispatchHandle",
    "DispatchLayout",
    "DispatchResult",
    "LowLatencyCombineResult",
    "LowLatencyDispatchResult",
    "LowLatencyHandle",
]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Per-call tuning knobs (DeepEP's ``config=`` argument). Every field has a documented default.

    Attributes:
        num_sms: SMs the CUDA kernels may occupy for this call (the grid size of every kernel); ``None``
            uses the Buffer's ``num_sms``. Ignored by the portable backend.
        num_max_send_tokens: accepted for DeepEP compatibility; the CUDA kernels publish completion once
            per call (docs/kernels.md), so it has no effect.
    """

    num_sms: int | None = None
    num_max_send_tokens: int = 0


class DispatchLayout(NamedTuple):
    """Result of :meth:`Buffer.get_dispatch_layout`.

    Attributes:
        num_tokens_per_rank: ``[R]`` int32, tokens this rank sends to each rank (a token counts once per rank).
        num_tokens_per_rdma_rank: always ``None`` (no internode RDMA ranks in this runtime).
        num_tokens_per_expert: ``[E]`` int32, (token, expert) selections per expert.
        is_token_in_rank: ``[T, R]`` bool, whether token t goes to rank r.
        event: an :class:`EventOverlap` when ``async_finish`` was asked, else ``None``.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_rdma_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    event: EventOverlap | None


@dataclass(frozen=True, kw_only=True, eq=False)
class DispatchHandle:
    """Everything a combine or a cached dispatch needs to replay a dispatch's routing.

    Produced by :meth:`Buffer.dispatch`; read by field name, never unpacked by position. Tensors live on the
    dispatch's device.

    Attributes:
        buffer_id: identity of the :class:`Buffer` that made it (a handle only works with its own buffer).
        backend: name of the backend that made it.
        num_ranks: R.
        num_experts: E.
        num_tokens: T, tokens on this rank at dispatch time.
        hidden: H of the dispatched ``x``.
        num_topk: K of the dispatched ``topk_idx`` (0 when dispatched without top-k).
        is_token_in_rank: ``[T, R]`` bool.
        num_tokens_per_rank: ``[R]`` int32, rows this rank sent to each rank.
        rank_prefix_matrix: ``[R, R]`` int32; entry ``[i, j]`` is the number of rows ranks ``0..i`` sent to rank
            ``j``. Column ``j`` gives, on rank ``j``, where each source's rows end in ``recv_x``.
        send_token_idx: ``[S]`` int64, the source token of each sent row, destination-major then token order
            (S = ``num_tokens_per_rank.sum()``). In worst-case mode ``[T * R]``: those S entries, then -1 (S is
            not read back to the host there).
        recv_src_idx: ``[N]`` int32, the source token index of each received row (-1 on padding rows).
        recv_src_rank: ``[N]`` int32, the source rank of each received row (-1 on padding rows).
        num_recv_tokens: N, rows of ``recv_x`` (``num_worst_tokens`` in worst-case mode, padding included).
        send_counts: rows sent to each rank, on the host; ``None`` when it was not read back (worst-case mode).
        recv_counts: rows received from each rank, on the host; ``None`` in worst-case mode.
        num_recv_tokens_per_expert_list: received selections per local expert, padded to ``expert_alignment``.
        expert_alignment: the alignment the counts were padded to.
        num_worst_tokens: the worst-case row count asked for (0 = exact-size outputs).
        backend_state: backend-private data (for example kernel channel offsets); opaque to callers.
    """

    buffer_id: int
    backend: str
    num_ranks: int
    num_experts: int
    num_tokens: int
    hidden: int
    num_topk: int
    is_token_in_rank: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    rank_prefix_matrix: torch.Tensor
    send_token_idx: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_src_rank: torch.Tensor
    num_recv_tokens: int
    send_counts: tuple[int, ...] | None
    recv_counts: tuple[int, ...] | None
    num_recv_tokens_per_expert_list: list[int]
    expert_alignment: int
    num_worst_tokens: int
    backend_state: Any = field(default=None, repr=False)


class DispatchResult(NamedTuple):
    """Result of :meth:`Buffer.dispatch`.

    Attributes:
        recv_x: ``[N, H]`` in the dispatched dtype, or a tuple ``(float8_e4m3fn [N, H], float32 [N, H/128])``.
            Rows are ordered by source rank, then source token index; in worst-case mode the valid rows come
            first and the rest are padding.
        recv_topk_idx: ``[N, K]`` int64, local expert ids (``global - rank * E_local``), -1 for experts on other
            ranks and on padding rows; ``None`` for a cached dispatch or when ``topk_idx`` was not given.
        recv_topk_weights: ``[N, K]`` float32, the weights of local experts, 0 elsewhere; ``None`` as above.
        num_recv_tokens_per_expert_list: received selections per local expert, each padded up to a multiple
            of ``expert_alignment`` (a Python list; empty in worst-case mode, which never reads counts back).
        handle: the :class:`DispatchHandle` for combine and cached dispatch.
        event: an :class:`EventOverlap` when ``async_finish`` was asked, else ``None``.
    """

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert_list: list[int]
    handle: DispatchHandle
    event: EventOverlap | None


class CombineResult(NamedTuple):
    """Result of :meth:`Buffer.combine`.

    Attributes:
        combined_x: ``[T, H]`` in the dtype of the combined ``x``: for each token, the float32 sum of its rows
            from every rank it was dispatched to, plus ``bias``.
        combined_topk_weights: ``[T, K]`` float32, the same sum over ``topk_weights`` (``None`` if not given).
        event: an :class:`EventOverlap` when ``async_finish`` was asked, else ``None``.
    """

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None
    event: EventOverlap | None


@dataclass(frozen=True, kw_only=True, eq=False)
class LowLatencyHandle:
    """Routing of one :meth:`Buffer.low_latency_dispatch`, read by :meth:`Buffer.low_latency_combine`.

    Attributes:
        buffer_id: identity of the :class:`Buffer` that made it.
        backend: name of the backend that made it.
        num_ranks: R.
        num_experts: E.
        num_max_dispatch_tokens_per_rank: M.
        num_tokens: T on this rank at dispatch time.
        hidden: H.
        num_topk: K.
        src_token_idx: ``[E_local, R * M]`` int32, source token index of each received slot (-1 when empty).
        src_rank: ``[E_local, R * M]`` int32, source rank of each received slot (-1 when empty).
        layout_range: ``[E_local, R, 2]`` int32, per local expert and source rank the (offset, count) of its rows.
        backend_state: backend-private data; opaque to callers.
    """

    buffer_id: int
    backend: str
    num_ranks: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    num_tokens: int
    hidden: int
    num_topk: int
    src_token_idx: torch.Tensor
    src_rank: torch.Tensor
    layout_range: torch.Tensor
    backend_state: Any = field(default=None, repr=False)


class LowLatencyDispatchResult(NamedTuple):
    """Result of :meth:`Buffer.low_latency_dispatch`.

    Attributes:
        recv_x: ``[E_local, R * M, H]`` bf16, or ``(float8_e4m3fn [E_local, R*M, H], float32 [E_local, R*M, H/128])``
            with ``use_fp8``. Expert-major; each expert's rows are packed from slot 0, ordered by source rank,
            then source token index. Slots past ``recv_count`` are unspecified.
        recv_count: ``[E_local]`` int32 on the device, valid rows per local expert.
        handle: the :class:`LowLatencyHandle`.
        event: an :class:`EventOverlap` when ``async_finish`` was asked, else ``None``.
        hook: with ``return_recv_hook=True``, a callable that completes the receive; else ``None``.
    """

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    event: EventOverlap | None
    hook: Callable[[], None] | None


class LowLatencyCombineResult(NamedTuple):
    """Result of :meth:`Buffer.low_latency_combine`.

    Attributes:
        combined_x: ``[T, H]`` bf16 (the dtype of ``x``): ``sum_k topk_weights[t, k] * expert_k(x_t)``, float32
            accumulation, zero for tokens with no expert.
        event: an :class:`EventOverlap` when ``async_finish`` was asked, else ``None``.
        hook: with ``return_recv_hook=True``, a callable that completes the receive; else ``None``.
    """

    combined_x: torch.Tensor
    event: EventOverlap | None
    hook: Callable[[], None] | None
