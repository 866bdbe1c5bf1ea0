"""DeepEP's Python API on moe_comm, for code written against ``deep_ep``: replace ``import deep_ep`` by
``from moe_comm import deep_ep`` and its intranode and low-latency calls run unchanged, on whichever moe_comm
backend the Buffer picks (the portable one too, so on CPU ranks over gloo).

What is the same: :class:`Buffer`'s constructor arguments and its static helpers (``set_num_sms``, ``capture``,
``get_dispatch_config``, ``get_combine_config``, ``get_low_latency_rdma_size_hint``), ``Config`` with DeepEP's
positional fields, and the argument lists of ``get_dispatch_layout``, ``dispatch``, ``combine``,
``low_latency_dispatch`` and ``low_latency_combine``. Results unpack as DeepEP's tuples do, and their ``event``
is always an :class:`~moe_comm.EventOverlap` (a no-op one when nothing is pending), as DeepEP's is.

What differs, on purpose:

* Buffer sizes. ``num_nvl_bytes`` and ``num_rdma_bytes`` are kept as attributes but not used: moe_comm sizes
  its buffers from the calls and grows them collectively (for CUDA graphs, run a step once before capturing
  it). The size hints therefore return 0. There is no RDMA transport, so the QP, NVLink-for-RDMA and MNNVL
  options are accepted and unused; every Buffer runs both normal and low-latency mode, so
  ``clean_low_latency_buffer`` has nothing to clean.
* Handles are :class:`~moe_comm.DispatchHandle` / :class:`~moe_comm.LowLatencyHandle` objects, not tuples;
  pass them back as DeepEP code does.
* Not provided (a :class:`ValueError` naming the argument, raised before any communication): ``round_scale``,
  ``use_ue8m0``, ``use_logfmt``, ``zero_copy``, the wait-cost statistics, and ``cumulative_local_expert_recv_stats``
  together with ``async_finish``; ``get_local_buffer_tensor`` raises :class:`NotImplementedError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_comm.buffer import Buffer as _Buffer
from moe_comm.events import EventOverlap
from moe_comm.types import (
    CombineResult,
    DispatchLayout,
    DispatchResult,
    LowLatencyCombineResult,
    LowLatencyDispatchResult,
)
from moe_comm.types import Config as _Config
from moe_comm.validation import require

__all__ = ["Buffer", "Config", "EventOverlap"]


@dataclass(frozen=True, init=False)
class Config(_Config):
    """DeepEP's ``Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)``: ``num_sms`` bounds the SMs of the
    call's kernels; the chunk sizes tune DeepEP's ring queues, which moe_comm does not have (docs/kernels.md),
    so they are recorded and unused."""

    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 128

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 128) -> None:
        super().__init__(num_sms=num_sms, num_max_send_tokens=num_max_nvl_chunked_send_tokens)
        object.__setattr__(self, "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens)
        object.__setattr__(self, "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens)
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens)

    @property
    def num_max_nvl_chunked_send_tokens(self) -> int:
        return self.num_max_send_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: moe_comm sizes its buffers from the calls (see the module docstring)."""
        return 0

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: there is no RDMA buffer."""
        return 0


def _unsupported(name: str, value: Any, default: Any = None) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is its default (``None`` or ``False``)."""
    given = value is not None if default is None else bool(value) != bool(default)
    require(not given, ValueError, f"{name}: not supported by moe_comm's DeepEP API; leave it at {default!r}")


def _event_or_noop(event: EventOverlap | None) -> EventOverlap:
    return event if event is not None else EventOverlap()


class Buffer(_Buffer):
    """A :class:`moe_comm.Buffer` with DeepEP's constructor, static helpers and call signatures.

    Args:
        group: the process group (``None``: the default group, which DeepEP does not allow but costs nothing).
        num_nvl_bytes, num_rdma_bytes: kept as attributes, unused (moe_comm sizes its buffers from the calls).
        low_latency_mode: kept as an attribute; every Buffer runs both modes.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, explicitly_destroy,
            enable_shrink: DeepEP's RDMA and lifetime options, accepted and unused (call :meth:`destroy`, or
            rely on exit, as with any moe_comm Buffer).
        **options: moe_comm's own keyword arguments (``backend``, ``timeout_s``, ``comm``, ...); ``num_sms`` is
            the class-wide :attr:`num_sms` unless given.
    """

    num_sms = 20  # DeepEP's class attribute: the SMs of dispatch and combine without a config

    def __init__(self, group: dist.ProcessGroup | None = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False, use_fabric: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, **options: Any) -> None:
        self._own_num_sms = "num_sms" in options  # else the class-wide value, read at every call as DeepEP does
        options.setdefault("num_sms", type(self).num_sms)
        super().__init__(group, **options)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = bool(low_latency_mode)

    # ------------------------------------------------------------------------------------------------
    # static helpers

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs dispatch and combine use when called without a ``config`` (every Buffer of this class)."""
        require(isinstance(new_num_sms, int) and new_num_sms > 0, ValueError,
                f"new_num_sms: expected a positive int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current CUDA stream (a no-op event without CUDA), for ``previous_event=``."""
        if not torch.cuda.is_available():
            return EventOverlap()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event=event)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The config dispatch uses without one: :attr:`num_sms` SMs, for any group size."""
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The config combine uses without one: :attr:`num_sms` SMs, for any group size."""
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """0: moe_comm sizes its buffers from the calls (see the module docstring)."""
        return 0

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The backend's communication stream (``None`` where it has none, e.g. on CPU)."""
        return self.backend.comm_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        raise NotImplementedError("get_local_buffer_tensor: moe_comm does not expose its communication buffers")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: flags are compared against epochs that only grow (docs/kernels.md)."""

    def _default_config(self) -> Config:
        return Config(self.num_sms if self._own_num_sms else Buffer.num_sms)

    # ------------------------------------------------------------------------------------------------
    # normal mode

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> DispatchLayout:
        layout = super().get_dispatch_layout(topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream)
        return layout._replace(event=_event_or_noop(layout.event))

    def dispatch(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], handle: Any = None,
                 num_tokens_per_rank: torch.Tensor | None = None, num_tokens_per_rdma_rank: torch.Tensor | None = None,
                 is_token_in_rank: torch.Tensor | None = None, num_tokens_per_expert: torch.Tensor | None = None,
                 topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: _Config | None = None,
                 previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, num_experts: int | None = None) -> DispatchResult:
        result = super().dispatch(
            x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
            topk_weights, expert_alignment, num_worst_tokens, config if config is not None else self._default_config(),
            previous_event, async_finish, allocate_on_comm_stream, num_experts=num_experts)
        return result._replace(event=_event_or_noop(result.event))

    def combine(self, x: torch.Tensor, handle: Any, topk_weights: torch.Tensor | None = None,
                bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                config: _Config | None = None, previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> CombineResult:
        result = super().combine(x, handle, topk_weights, bias,
                                 config if config is not None else self._default_config(),
                                 previous_event, async_finish, allocate_on_comm_stream)
        return result._replace(event=_event_or_noop(result.event))

    # ------------------------------------------------------------------------------------------------
    # low-latency mode

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> LowLatencyDispatchResult:
        """As :meth:`moe_comm.Buffer.low_latency_dispatch`; ``cumulative_local_expert_recv_stats`` (``[E_local]``
        int32, optional) gets each local expert's received count added once the receive completes (after the
        hook, with ``return_recv_hook``)."""
        _unsupported("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        _unsupported("round_scale", round_scale, False)
        _unsupported("use_ue8m0", use_ue8m0, False)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            require(not async_finish, ValueError, "cumulative_local_expert_recv_stats: not supported with async_finish=True; "
                    "add result.recv_count to it after waiting on the event")
            local = num_experts // self.group_size if isinstance(num_experts, int) else -1
            require(isinstance(stats, torch.Tensor) and list(stats.shape) == [local], ValueError,
                    f"cumulative_local_expert_recv_stats: expected a [num_local_experts] = [{local}] tensor")
        result = super().low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                                              async_finish, return_recv_hook)
        hook = result.hook
        if stats is not None:
            if hook is None:
                stats.add_(result.recv_count.to(stats.dtype))
            else:
                hook = _then(hook, lambda: stats.add_(result.recv_count.to(stats.dtype)))
        return result._replace(event=_event_or_noop(result.event), hook=hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None) -> LowLatencyCombineResult:
        _unsupported("use_logfmt", use_logfmt, False)
        _unsupported("zero_copy", zero_copy, False)
        _unsupported("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
        result = super().low_latency_combine(x, topk_idx, topk_weights, handle, async_finish, return_recv_hook, out)
        return result._replace(event=_event_or_noop(result.event))


def _then(first: Callable[[], None], second: Callable[[], Any]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()
    return both
