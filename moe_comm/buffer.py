"""``Buffer``: the expert-parallel dispatch/combine API (DeepEP-compatible call signatures, typed results).

Legend: T tokens on this rank, H hidden size, K top-k, R ranks in the group, E experts (E_local = E / R
per rank; expert ``e`` lives on rank ``e // E_local``), N rows received, M max tokens per rank in
low-latency mode. ``x_TH`` is ``[T, H]``; ``topk_idx_TK`` is int64 with -1 for "no expert".

Every method is a collective: all ranks of the group call it, in the same order. Arguments are checked
on every rank and the ranks agree before any payload moves, so bad input raises everywhere instead of
leaving ranks waiting; every wait is bounded by ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from moe_comm.backends.base import BackendContext, CombineRequest, CommBackend, DispatchRequest
from moe_comm.backends.registry import resolve_backend
from moe_comm.collectives import StepContext
from moe_comm.env import settings
from moe_comm.events import EventOverlap, is_capturing
from moe_comm.types import (
    CombineResult,
    Config,
    DispatchHandle,
    DispatchLayout,
    DispatchResult,
    LowLatencyCombineResult,
    LowLatencyDispatchResult,
    LowLatencyHandle,
)
from moe_comm.validation import AgreementHeader, agree, check_topk, check_x, require

__all__ = ["Buffer"]

_buffer_ids = itertools.count(1)


def _group_from_mpi(comm: Any) -> dist.ProcessGroup:
    """The torch process group matching an mpi4py communicator (initialising torch.distributed if needed)."""
    from moe_comm.launch import init_distributed

    if not dist.is_initialized():
        init_distributed(launcher="mpi")
    members = comm.allgather(dist.get_rank())
    if len(members) == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"comm: an MPI communicator of {len(members)} of the {dist.get_world_size()} ranks was given; create the "
        "torch group on every rank with torch.distributed.new_group(ranks) and pass it as group= instead"
    )


class Buffer:
    """Dispatch and combine tokens across the ranks of a process group.

    Args:
        group: the process group; ``None`` means the default group.
        comm: an mpi4py communicator instead of ``group`` (it must span the default group).
        backend: ``"torch"`` (portable: ``torch.distributed`` collectives on gloo or NCCL), ``"cuda"``
            (custom intranode kernels, needs the built extension and GPUs) or ``"auto"`` (``cuda`` when
            usable, else ``torch``; ``MOE_COMM_BACKEND`` overrides).
        num_sms: SMs the CUDA kernels may occupy (per-call override: ``config=Config(num_sms=...)``).
        timeout_s: bound on every wait; ``None`` reads ``MOE_COMM_TIMEOUT_S`` (default 120 s).
        num_experts: default E for calls that omit the layout and ``num_experts``.
        check_inputs: ``True`` checks values (expert id ranges) and cross-rank agreement on every call;
            ``False`` only checks types and shapes (no extra collective); ``"auto"`` (default) is ``True``
            except where it would add a host synchronisation to a call that promises none (CUDA tensors
            with ``num_worst_tokens > 0`` and low-latency mode).
        **backend_options: backend-specific sizing, e.g. ``num_max_tokens`` for the CUDA backend's buffers.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        comm: Any = None,
        backend: str = "auto",
        num_sms: int = 20,
        timeout_s: float | None = None,
        num_experts: int | None = None,
        check_inputs: bool | str = "auto",
        **backend_options: Any,
    ) -> None:
        if group is not None and comm is not None:
            raise ValueError("pass either group= or comm=, not both")
        if not dist.is_initialized() and comm is None:
            raise RuntimeError(
                "torch.distributed is not initialised: call moe_comm.launch.init_distributed() first "
                "(it works under torchrun, mpirun, or alone)"
            )
        if comm is not None:
            group = _group_from_mpi(comm)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        require(isinstance(num_sms, int) and num_sms > 0, ValueError, f"num_sms: expected a positive int, got {num_sms!r}")
        require(check_inputs in (True, False, "auto"), ValueError, f"check_inputs: expected True, False or 'auto', got {check_inputs!r}")
        if num_experts is not None:
            self._check_num_experts(num_experts)
        self.num_sms = num_sms
        self.timeout_s = float(timeout_s if timeout_s is not None else settings().timeout_s)
        self.num_experts = num_experts
        self.check_inputs = check_inputs
        self.buffer_id = next(_buffer_ids) * 1_000_003 + self.rank
        is_nccl = dist.get_backend(self.group) == "nccl"
        backend_cls = resolve_backend(backend, is_nccl=is_nccl)
        # Small host-side exchanges run where the group works; the data lives on the GPU for the cuda backend
        # even over gloo (several ranks sharing one GPU).
        self._group_device = torch.device("cuda", torch.cuda.current_device()) if is_nccl else torch.device("cpu")
        device = torch.device("cuda", torch.cuda.current_device()) if is_nccl or backend_cls.name == "cuda" else torch.device("cpu")
        self.backend_name = backend_cls.name
        self.device = device
        self._backend: CommBackend | None = backend_cls(
            BackendContext(
                group=self.group,
                rank=self.rank,
                world_size=self.group_size,
                buffer_id=self.buffer_id,
                timeout_s=self.timeout_s,
                num_sms=num_sms,
                device=device,
                options=dict(backend_options),
            )
        )

    # ------------------------------------------------------------------------------------------------
    # lifecycle

    @property
    def backend(self) -> CommBackend:
        if self._backend is None:
            raise RuntimeError(f"rank {self.rank}: this Buffer was destroyed")
        return self._backend

    def raise_if_failed(self) -> None:
        """Raise the :class:`CommTimeoutError` (or :class:`BufferCapacityError`) a kernel of this Buffer recorded,
        if any, without synchronising. Every call checks this itself; replays of a captured CUDA graph run no
        host code, so call it after replays (what the kernels recorded becomes visible once they ran)."""
        self.backend.raise_if_failed()

    def destroy(self) -> None:
        """Release the backend's resources. The Buffer cannot be used afterwards. Idempotent."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"Buffer(rank={self.rank}, group_size={self.group_size}, backend={self.backend_name!r}, num_sms={self.num_sms})"

    # ------------------------------------------------------------------------------------------------
    # shared machinery

    def _check_num_experts(self, num_experts: object) -> int:
        require(isinstance(num_experts, int) and not isinstance(num_experts, bool), TypeError, f"num_experts: expected an int, got {type(num_experts).__name__}")
        assert isinstance(num_experts, int)
        require(num_experts > 0, ValueError, f"num_experts: expected > 0, got {num_experts}")
        require(
            num_experts % self.group_size == 0,
            ValueError,
            f"num_experts: {num_experts} experts cannot be split evenly over {self.group_size} ranks; use a multiple of {self.group_size}",
        )
        return num_experts

    def _step(self, op: str) -> StepContext:
        return StepContext(self.group, self.rank, op, self.timeout_s)

    def _checks_values(self, device: torch.device, no_host_sync: bool) -> bool:
        """Whether to check input values (a host synchronisation and a collective). "auto" skips it on a CUDA
        device where the call promises no host synchronisation, and while a CUDA graph is being captured."""
        if self.check_inputs == "auto":
            return not (device.type == "cuda" and (no_host_sync or is_capturing()))
        return bool(self.check_inputs)

    def _agree(
        self,
        op: str,
        header: AgreementHeader,
        error: Exception | None,
        values_checked: bool,
        rows_per_rank: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run the agreement step (or raise the local error at once when checks are off).

        Returns the ``[R, R]`` matrix of rows each rank sends each rank when ``rows_per_rank`` was given on
        every rank and the step ran, else ``None``.
        """
        if values_checked:
            return agree(self._step(op), header, error, self._group_device, rows_per_rank)
        if error is not None:
            raise error
        return None

    def _check_handle(self, handle: object, cls: type, argument: str = "handle") -> None:
        require(isinstance(handle, cls), TypeError, f"{argument}: expected a {cls.__name__}, got {type(handle).__name__}")
        require(
            handle.buffer_id == self.buffer_id,  # type: ignore[attr-defined]
            ValueError,
            f"{argument}: this handle was made by another Buffer (id {handle.buffer_id}, this one is {self.buffer_id}); "  # type: ignore[attr-defined]
            "combine and cached dispatch need the handle of this Buffer's own dispatch",
        )

    def _check_device(self, tensor: torch.Tensor, argument: str) -> None:
        require(
            tensor.device.type == self.device.type,
            ValueError,
            f"{argument}: on {tensor.device}, but this Buffer's group ({dist.get_backend(self.group)}) works on {self.device.type}",
        )

    @contextlib.contextmanager
    def _on_comm_stream(self, previous_event: EventOverlap | None, after_current: bool = False) -> Iterator[torch.cuda.Stream | None]:
        """Run the body on the backend's communication stream after ``previous_event`` (or the current stream;
        both with ``after_current``, when the call itself produced inputs on the current stream)."""
        stream = self.backend.comm_stream()
        if stream is None:
            if previous_event is not None:
                previous_event.current_stream_wait()
            yield None
            return
        waits_for_event = previous_event is not None and previous_event.event is not None
        if waits_for_event:
            stream.wait_event(previous_event.event)
        if after_current or not waits_for_event:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield stream

    def _finish(
        self,
        finish: Callable[[], None] | None,
        async_finish: bool,
        stream: torch.cuda.Stream | None,
        keep_alive: tuple[Any, ...],
    ) -> EventOverlap | None:
        """Complete now (the current stream waits) or hand back an event that completes later."""
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        if async_finish:
            return EventOverlap(event=event, waiter=finish, extra_tensors=keep_alive)
        if finish is not None:
            finish()
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        return None

    # ------------------------------------------------------------------------------------------------
    # normal mode

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> DispatchLayout:
        """Count where each token goes. Local: no communication.

        Args:
            topk_idx: ``[T, K]`` int64 global expert ids, -1 for none.
            num_experts: E, a multiple of the group size.
            previous_event: wait for this event first.
            async_finish: return an event instead of making the current stream wait.
            allocate_on_comm_stream: accepted for DeepEP compatibility (outputs follow the stream used).

        Returns:
            ``DispatchLayout(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool, event)``.
        """
        num_experts = self._check_num_experts(num_experts)
        require(isinstance(topk_idx, torch.Tensor), TypeError, f"topk_idx: expected a torch.Tensor, got {type(topk_idx).__name__}")
        idx, _ = check_topk(topk_idx, None, topk_idx.shape[0] if topk_idx.dim() else -1, num_experts, self._checks_values(topk_idx.device, False))
        assert idx is not None
        with self._on_comm_stream(previous_event) as stream:
            per_rank, per_expert, in_rank = self.backend.get_dispatch_layout(idx, num_experts)
        event = self._finish(None, async_finish, stream, (idx,))
        return DispatchLayout(per_rank, None, per_expert, in_rank, event)

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        *,
        num_experts: int | None = None,
    ) -> DispatchResult:
        """Send every token once to each rank that holds at least one of its experts.

        Args:
            x: ``[T, H]`` bf16/fp16/fp32/fp64, or ``(float8_e4m3fn [T, H], float32 scales [T, ceil(H/128)])``.
            handle: a previous dispatch's handle to replay its routing (cached dispatch: no layout or top-k
                arguments, no count exchange).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: the layout from
                :meth:`get_dispatch_layout`; computed from ``topk_idx`` when omitted.
            num_tokens_per_rdma_rank: accepted for DeepEP compatibility; must be ``None``.
            topk_idx: ``[T, K]`` int64 global expert ids, -1 for none.
            topk_weights: ``[T, K]`` float32, only together with ``topk_idx``.
            expert_alignment: pad each local expert's received count up to a multiple of this.
            num_worst_tokens: when > 0, outputs have exactly this many rows (valid rows first, then padding
                with ``recv_topk_idx == -1``) and the host never waits for the device. Every rank's T must
                be at most ``num_worst_tokens // R`` (the usual choice is ``T * R``).
            config: per-call :class:`Config` (``num_sms``).
            previous_event: make the communication wait for this event instead of the current stream (and for the
                current stream too when the layout arguments are omitted, since the layout is then computed there).
            async_finish: return an event to wait on instead of completing before returning.
            allocate_on_comm_stream: accepted for DeepEP compatibility; outputs are allocated on the
                stream that produces them and kept alive by the event.
            num_experts: E when neither the layout nor the Buffer says it.

        Returns:
            :class:`DispatchResult` ``(recv_x, recv_topk_idx, recv_topk_weights,
            num_recv_tokens_per_expert_list, handle, event)``; see its docstring for shapes and order.
        """
        op = "dispatch"
        error: Exception | None = None
        header = AgreementHeader(op)
        data = scales = idx = weights = None
        values_checked = True
        layout_computed = False
        request: DispatchRequest | None = None
        try:
            data, scales = check_x(x, allow_fp8=True)
            self._check_device(data, "x")
            num_tokens = data.shape[0]
            require(num_tokens_per_rdma_rank is None, ValueError, "num_tokens_per_rdma_rank: this runtime has no RDMA ranks; pass None")
            require(isinstance(expert_alignment, int) and expert_alignment >= 1, ValueError, f"expert_alignment: expected an int >= 1, got {expert_alignment!r}")
            require(isinstance(num_worst_tokens, int) and num_worst_tokens >= 0, ValueError, f"num_worst_tokens: expected an int >= 0, got {num_worst_tokens!r}")
            values_checked = self._checks_values(data.device, num_worst_tokens > 0)
            require(handle is not None or num_worst_tokens > 0 or not is_capturing(), ValueError,
                    "num_worst_tokens: a dispatch captured in a CUDA graph needs num_worst_tokens > 0 (or a handle): "
                    "an exact dispatch waits on the host for the received counts")
            num_sms = (config.num_sms if config is not None and config.num_sms is not None else self.num_sms)
            if handle is not None:
                self._check_handle(handle, DispatchHandle)
                require(topk_idx is None and topk_weights is None, ValueError, "topk_idx/topk_weights: a cached dispatch (handle given) replays the handle's routing; pass None")
                require(
                    num_tokens == handle.num_tokens,
                    ValueError,
                    f"x: the handle was made for T={handle.num_tokens} tokens, got {num_tokens}",
                )
                experts = handle.num_experts
                worst = handle.num_worst_tokens
                require(num_worst_tokens in (0, worst), ValueError, f"num_worst_tokens: the handle was made with {worst}, got {num_worst_tokens}")
                header = AgreementHeader(op, hidden=data.shape[1], dtype=data.dtype, num_experts=experts, num_worst_tokens=worst, cached=1)
                request = DispatchRequest(
                    x=data, x_scales=scales, topk_idx=None, topk_weights=None, num_tokens_per_rank=None,
                    is_token_in_rank=None, num_tokens_per_expert=None, num_experts=experts,
                    expert_alignment=handle.expert_alignment, num_worst_tokens=worst, handle=handle, num_sms=num_sms,
                )
            else:
                if num_experts is None:
                    num_experts = num_tokens_per_expert.numel() if isinstance(num_tokens_per_expert, torch.Tensor) else self.num_experts
                require(num_experts is not None, ValueError, "num_experts: cannot tell the number of experts; pass num_tokens_per_expert, num_experts=, or Buffer(num_experts=)")
                experts = self._check_num_experts(num_experts)
                idx, weights = check_topk(topk_idx, topk_weights, num_tokens, experts, values_checked)
                if idx is not None:
                    self._check_device(idx, "topk_idx")
                if idx is None:
                    require(
                        is_token_in_rank is not None and num_tokens_per_rank is not None and num_tokens_per_expert is not None,
                        ValueError,
                        "topk_idx: needed to compute the layout unless is_token_in_rank, num_tokens_per_rank and num_tokens_per_expert are all given",
                    )
                if num_worst_tokens:
                    block = num_worst_tokens // self.group_size
                    require(
                        num_tokens <= block,
                        ValueError,
                        f"num_worst_tokens: {num_worst_tokens} rows cannot hold {self.group_size} ranks x {num_tokens} tokens; "
                        f"use at least {num_tokens * self.group_size} (every rank's T <= num_worst_tokens // R)",
                    )
                if is_token_in_rank is None or num_tokens_per_rank is None or num_tokens_per_expert is None:
                    assert idx is not None
                    layout_computed = True  # on the current stream: the communication waits for it too
                    per_rank, per_expert, in_rank = self.backend.get_dispatch_layout(idx, experts)
                    num_tokens_per_rank = per_rank if num_tokens_per_rank is None else num_tokens_per_rank
                    num_tokens_per_expert = per_expert if num_tokens_per_expert is None else num_tokens_per_expert
                    is_token_in_rank = in_rank if is_token_in_rank is None else is_token_in_rank
                require(
                    is_token_in_rank.dtype == torch.bool and list(is_token_in_rank.shape) == [num_tokens, self.group_size],
                    ValueError,
                    f"is_token_in_rank: expected bool [{num_tokens}, {self.group_size}], got {is_token_in_rank.dtype} {list(is_token_in_rank.shape)}",
                )
                require(list(num_tokens_per_rank.shape) == [self.group_size], ValueError, f"num_tokens_per_rank: expected [{self.group_size}], got {list(num_tokens_per_rank.shape)}")
                require(list(num_tokens_per_expert.shape) == [experts], ValueError, f"num_tokens_per_expert: expected [{experts}], got {list(num_tokens_per_expert.shape)}")
                header = AgreementHeader(
                    op, hidden=data.shape[1], dtype=data.dtype, num_experts=experts,
                    num_topk=-1 if idx is None else idx.shape[1], has_weights=int(weights is not None),
                    num_worst_tokens=num_worst_tokens, expert_alignment=expert_alignment, cached=0,
                    async_finish=int(bool(async_finish)),
                )
                request = DispatchRequest(
                    x=data, x_scales=scales, topk_idx=idx, topk_weights=weights,
                    num_tokens_per_rank=num_tokens_per_rank.contiguous(), is_token_in_rank=is_token_in_rank.contiguous(),
                    num_tokens_per_expert=num_tokens_per_expert.contiguous(), num_experts=experts,
                    expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, handle=None, num_sms=num_sms,
                    async_finish=bool(async_finish),
                )
        except (TypeError, ValueError) as exc:
            error = exc
        sending = request.num_tokens_per_rank if request is not None and request.num_worst_tokens == 0 else None
        rank_matrix = self._agree(op, header, error, values_checked, sending)
        assert request is not None
        if rank_matrix is not None:
            request = dataclasses.replace(request, rank_matrix=rank_matrix)
        with self._on_comm_stream(previous_event, after_current=layout_computed) as stream:
            out = self.backend.dispatch(request)
        event = self._finish(out.finish, async_finish, stream, (data, scales, idx, weights))
        recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = out.recv_x
        if out.recv_x_scales is not None:
            recv_x = (out.recv_x, out.recv_x_scales)
        return DispatchResult(
            recv_x,
            out.recv_topk_idx,
            out.recv_topk_weights,
            list(out.handle.num_recv_tokens_per_expert_list),
            out.handle,
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> CombineResult:
        """Return each received row to its token's rank and sum the rows of every token there.

        Args:
            x: ``[N, H]`` (bf16/fp16/fp32/fp64), rows in the order ``dispatch`` returned them.
            handle: that dispatch's :class:`DispatchHandle`.
            topk_weights: ``[N, K]`` float32, summed the same way (``None`` to skip).
            bias: a ``[T, H]`` tensor or a pair of them (either may be ``None``), added after the sum.
            config, previous_event, async_finish, allocate_on_comm_stream: as in :meth:`dispatch`.

        Returns:
            :class:`CombineResult` ``(combined_x [T, H] in x's dtype, combined_topk_weights [T, K] or None, event)``.
            The sum is accumulated in float32 (float64 for float64 inputs), rank by rank in rank order.
        """
        op = "combine"
        error: Exception | None = None
        header = AgreementHeader(op)
        values_checked = True
        request: CombineRequest | None = None
        data = None
        try:
            self._check_handle(handle, DispatchHandle)
            data, _ = check_x(x, allow_fp8=False)
            self._check_device(data, "x")
            values_checked = self._checks_values(data.device, handle.num_worst_tokens > 0)
            require(
                data.shape[0] == handle.num_recv_tokens,
                ValueError,
                f"x: expected {handle.num_recv_tokens} rows (the rows this rank received in the dispatch), got {data.shape[0]}",
            )
            weights = None
            if topk_weights is not None:
                require(isinstance(topk_weights, torch.Tensor) and topk_weights.dtype == torch.float32, TypeError, "topk_weights: expected a float32 tensor")
                require(topk_weights.dim() == 2 and topk_weights.shape[0] == data.shape[0], ValueError, f"topk_weights: expected [{data.shape[0]}, K], got {list(topk_weights.shape)}")
                weights = topk_weights.contiguous()
            pair = bias if isinstance(bias, tuple) else (bias, None)
            require(len(pair) == 2, ValueError, "bias: expected a tensor or a pair of tensors")
            for i, b in enumerate(pair):
                if b is not None:
                    require(isinstance(b, torch.Tensor), TypeError, f"bias[{i}]: expected a tensor, got {type(b).__name__}")
                    require(list(b.shape) == [handle.num_tokens, data.shape[1]], ValueError, f"bias[{i}]: expected [{handle.num_tokens}, {data.shape[1]}], got {list(b.shape)}")
            num_sms = config.num_sms if config is not None and config.num_sms is not None else self.num_sms
            header = AgreementHeader(op, hidden=data.shape[1], dtype=data.dtype, has_weights=int(weights is not None), num_worst_tokens=handle.num_worst_tokens)
            request = CombineRequest(x=data, handle=handle, topk_weights=weights, bias=(pair[0], pair[1]), num_sms=num_sms)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(op, header, error, values_checked)
        assert request is not None
        with self._on_comm_stream(previous_event) as stream:
            out = self.backend.combine(request)
        event = self._finish(out.finish, async_finish, stream, (data,))
        return CombineResult(out.combined_x, out.combined_topk_weights, event)

    # ------------------------------------------------------------------------------------------------
    # low-latency mode

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool = True,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> LowLatencyDispatchResult:
        """Decode-time dispatch into a static expert-major layout (no host synchronisation).

        Args:
            x: ``[T, H]`` bf16 (any float dtype accepted), T <= ``num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[T, K]`` int64 global expert ids, -1 for none.
            num_max_dispatch_tokens_per_rank: M, the same on every rank.
            num_experts: E.
            use_fp8: cast to FP8 per token per 128 channels before sending (``scale = amax / 448``).
            async_finish: return an event instead of completing before returning.
            return_recv_hook: only issue the sends; call ``hook()`` later to receive.

        Returns:
            :class:`LowLatencyDispatchResult` ``(recv_x [E_local, R*M, H] (+ scales with FP8), recv_count [E_local]
            int32, handle, event, hook)``.
        """
        op = "low_latency_dispatch"
        error: Exception | None = None
        header = AgreementHeader(op)
        values_checked = True
        data = idx = None
        try:
            data, _ = check_x(x, allow_fp8=False)
            self._check_device(data, "x")
            values_checked = self._checks_values(data.device, True)
            experts = self._check_num_experts(num_experts)
            require(isinstance(num_max_dispatch_tokens_per_rank, int) and num_max_dispatch_tokens_per_rank > 0, ValueError,
                    f"num_max_dispatch_tokens_per_rank: expected a positive int, got {num_max_dispatch_tokens_per_rank!r}")
            require(data.shape[0] <= num_max_dispatch_tokens_per_rank, ValueError,
                    f"x: {data.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}")
            idx, _ = check_topk(topk_idx, None, data.shape[0], experts, values_checked)
            require(idx is not None, ValueError, "topk_idx: required in low-latency mode")
            assert idx is not None
            header = AgreementHeader(op, hidden=data.shape[1], dtype=data.dtype, num_experts=experts, num_topk=idx.shape[1],
                                     has_weights=int(bool(use_fp8)), max_tokens=num_max_dispatch_tokens_per_rank)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(op, header, error, values_checked)
        assert data is not None and idx is not None
        with self._on_comm_stream(None) as stream:
            out = self.backend.low_latency_dispatch(data, idx, num_max_dispatch_tokens_per_rank, num_experts, bool(use_fp8), return_recv_hook)
        event = self._finish(None, async_finish, stream, (data, idx))
        recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = out.recv_x
        if out.recv_x_scales is not None:
            recv_x = (out.recv_x, out.recv_x_scales)
        return LowLatencyDispatchResult(recv_x, out.recv_count, out.handle, event, out.hook)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> LowLatencyCombineResult:
        """Return expert outputs to their tokens and reduce them with the gating weights.

        Args:
            x: ``[E_local, R*M, H]`` expert outputs in the layout ``low_latency_dispatch`` returned.
            topk_idx: ``[T, K]`` int64, the ids given to the dispatch.
            topk_weights: ``[T, K]`` float32 gating weights.
            handle: the dispatch's :class:`LowLatencyHandle`.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: optional contiguous ``[T, H]`` tensor of ``x``'s dtype to write the result into.

        Returns:
            :class:`LowLatencyCombineResult` ``(combined_x [T, H], event, hook)``.
        """
        op = "low_latency_combine"
        error: Exception | None = None
        header = AgreementHeader(op)
        idx = weights = None
        values_checked = True
        try:
            self._check_handle(handle, LowLatencyHandle)
            require(isinstance(x, torch.Tensor), TypeError, f"x: expected a torch.Tensor, got {type(x).__name__}")
            values_checked = self._checks_values(x.device, True)
            slots = handle.num_ranks * handle.num_max_dispatch_tokens_per_rank
            expected = [handle.num_experts // handle.num_ranks, slots, handle.hidden]
            require(list(x.shape) == expected, ValueError, f"x: expected [E_local, R*M, H] = {expected}, got {list(x.shape)}")
            idx, weights = check_topk(topk_idx, topk_weights, handle.num_tokens, handle.num_experts, values_checked)
            require(idx is not None and weights is not None, ValueError, "topk_idx/topk_weights: both are required")
            if out is not None:
                require(isinstance(out, torch.Tensor) and list(out.shape) == [handle.num_tokens, handle.hidden]
                        and out.dtype == x.dtype and out.is_contiguous(), ValueError,
                        f"out: expected a contiguous [{handle.num_tokens}, {handle.hidden}] tensor of x's dtype {x.dtype}")
            header = AgreementHeader(op, hidden=handle.hidden, dtype=x.dtype, num_experts=handle.num_experts, num_topk=handle.num_topk,
                                     max_tokens=handle.num_max_dispatch_tokens_per_rank)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(op, header, error, values_checked)
        assert idx is not None and weights is not None
        with self._on_comm_stream(None) as stream:
            combined, hook = self.backend.low_latency_combine(x.contiguous(), idx, weights, handle, return_recv_hook, out)
        event = self._finish(None, async_finish, stream, (x,))
        return LowLatencyCombineResult(combined, event, hook)
