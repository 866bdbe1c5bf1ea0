"""The CUDA-kernel backend (``backend="cuda"``): intranode kernels in ``moe_comm._C``, built from csrc/ by setup.py.

Each rank owns a symmetric device buffer shared with its peers through CUDA IPC (``cuda_memory.py``); a
dispatch is a send kernel that writes every token record straight into its final region slot on each
destination, then a receive kernel that waits for every source's flag and copies the rows out; combine is
the same in reverse with a float32 reduction in rank order (docs/kernels.md). Every kernel runs on exactly
``num_sms`` blocks on the backend's communication stream, so it occupies at most ``num_sms`` SMs.

The group may be NCCL (one GPU per rank) or gloo (several ranks sharing a GPU, the single-GPU test mode):
only the small host-side exchanges (argument agreement, counts, IPC handles) go through the group.
Limits: 1 to 8 ranks, rows a multiple of 16 bytes, top-k <= 32. Low-latency mode runs the same kernels in
worst-case form (``M`` rows per source, no host synchronisation) and rearranges on the device; with
``return_recv_hook=True`` call the hook before the next operation on the same Buffer (the next send waits
for this receive).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_comm.backends import cuda_intranode as ops
from moe_comm.backends.base import (
    BackendContext,
    CombineOutput,
    CombineRequest,
    CommBackend,
    DispatchOutput,
    DispatchRequest,
    LowLatencyDispatchOutput,
)
from moe_comm.backends.cuda_memory import SymmetricBuffer, round_region
from moe_comm.backends.torch_backend import gather_count_matrix
from moe_comm.collectives import StepContext, all_gather_rows, wait_all
from moe_comm.events import is_capturing
from moe_comm.fp8 import num_scale_blocks
from moe_comm.layout import pad_to_alignment
from moe_comm.types import DispatchHandle, LowLatencyHandle

__all__ = ["CudaBackend", "cuda_dispatch_layout", "extension", "extension_status", "sm_copy"]



def extension() -> Any | None:
    """The compiled ``moe_comm._C`` module, or ``None`` when it was not built."""
    try:
        return importlib.import_module("moe_comm._C")
    except ImportError:
        return None


def extension_status() -> tuple[bool, str]:
    """``(extension importable and a CUDA device usable, reason)``."""
    ext = extension()
    if ext is None:
        return False, "moe_comm._C is not built (install with nvcc on PATH: pip install -e .)"
    status = ext.device_status()
    if status != "ok":
        return False, f"moe_comm._C built for {ext.compiled_architectures()} but {status}"
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    return True, f"moe_comm._C built for {ext.compiled_architectures()}"


def _require() -> Any:
    ok, reason = extension_status()
    if not ok:
        raise RuntimeError(f"cuda backend: {reason}")
    return extension()


def cuda_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_sms: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layout on device: ``topk_idx [T, K] int64`` -> ``(per_rank [R] int32, per_expert [E] int32, in_rank [T, R] bool)``."""
    ext = _require()
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64 or not topk_idx.is_cuda:
        raise ValueError("topk_idx: expected a [T, K] int64 CUDA tensor")
    topk_idx = topk_idx.contiguous()
    t, k = topk_idx.shape
    dev = topk_idx.device
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=dev)
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
    in_rank = torch.empty(t, num_ranks, dtype=torch.bool, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    ext.get_dispatch_layout(topk_idx.data_ptr(), t, k, num_experts, num_ranks, per_rank.data_ptr(),
                            per_expert.data_ptr(), in_rank.data_ptr(), num_sms, stream)
    return per_rank, per_expert, in_rank


def sm_copy(dst: torch.Tensor, src: torch.Tensor, num_sms: int) -> None:
    """Copy ``src`` into ``dst`` (same byte size, CUDA, contiguous) with a grid of ``num_sms`` blocks."""
    ext = _require()
    if dst.nbytes != src.nbytes or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("sm_copy: dst and src must be contiguous with the same byte size")
    ext.sm_copy(dst.data_ptr(), src.data_ptr(), src.nbytes, num_sms, torch.cuda.current_stream(src.device).cuda_stream)


class CudaBackend(CommBackend):
    """Intranode CUDA kernels over symmetric buffers (see the module docstring).

    Backend options (``Buffer(..., **options)``):
        num_max_tokens: rows per (source, destination) pair to size the buffers for at the first call
            (default: sized by the first call and grown, collectively, when a later call needs more).
        max_row_bytes: record row bytes to size for together with ``num_max_tokens`` (default 7168 * 2).
    """

    name = "cuda"
    # backend="auto" picks this backend only once the kernels have passed scripts/gpu_check.sh on a GPU
    # (docs/gpu-log.md); until then it must be asked for by name.
    auto_select = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return extension_status()

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        ext = _require()
        if not 1 <= context.world_size <= ext.MAX_RANKS:
            raise ValueError(f"backend: the cuda backend runs 1 to {ext.MAX_RANKS} ranks per group, got {context.world_size}")
        if context.device.type != "cuda":
            raise ValueError(f"backend: the cuda backend needs a CUDA device, got {context.device}")
        self._device = context.device
        self._stream = torch.cuda.Stream(device=self._device)
        self._host_device = self._device if dist.get_backend(context.group) == "nccl" else torch.device("cpu")
        self._mem: SymmetricBuffer | None = None
        rows = int(context.options.get("num_max_tokens", 0))
        row_bytes = int(context.options.get("max_row_bytes", 7168 * 2))
        self._min_dispatch_bytes = rows * ops.dispatch_record_bytes(row_bytes, row_bytes // 128, 8) if rows else 0
        self._min_combine_bytes = rows * ops.combine_record_bytes(row_bytes, 8) if rows else 0

    # ------------------------------------------------------------------------------------------------
    # buffers

    def comm_stream(self) -> torch.cuda.Stream:
        return self._stream

    def _ctx(self, op: str) -> StepContext:
        return StepContext(self.context.group, self.context.rank, op, self.context.timeout_s)

    def _barrier(self, op: str, step: str) -> None:
        """Bounded host barrier of the group (a one-element all-gather)."""
        ctx = self._ctx(op)
        world = self.context.world_size
        token = torch.zeros(1, 1, dtype=torch.int64, device=self._host_device)
        gathered = torch.empty(world, 1, dtype=torch.int64, device=self._host_device)
        wait_all(ctx, [all_gather_rows(ctx, gathered, token)], step)

    def _buffers(self, op: str, dispatch_bytes: int, combine_bytes: int) -> SymmetricBuffer:
        """The symmetric buffer, (re)allocated collectively when a call needs larger regions. Every rank
        computes the same sizes (from globally agreed counts), so every rank takes the same branch."""
        mem = self._mem
        if mem is not None and mem.dispatch_region_bytes >= dispatch_bytes and mem.combine_region_bytes >= combine_bytes:
            return mem
        if is_capturing():
            raise RuntimeError(
                f"rank {self.context.rank} {op}: the symmetric buffers must grow (to {dispatch_bytes} dispatch and "
                f"{combine_bytes} combine bytes per region), which cannot happen while a CUDA graph is captured; run "
                "the step once before capturing it, or size the Buffer with num_max_tokens=")
        want_dispatch = round_region(max(dispatch_bytes, self._min_dispatch_bytes, mem.dispatch_region_bytes if mem else 0))
        want_combine = round_region(max(combine_bytes, self._min_combine_bytes, mem.combine_region_bytes if mem else 0))
        if mem is not None:
            self._release(op)
        self._mem = SymmetricBuffer.allocate_ipc(self._ctx(op), self._host_device, self._device, want_dispatch, want_combine,
                                                 self.context.timeout_s)
        return self._mem

    def _release(self, op: str) -> None:
        """Wait until no rank's kernel can touch the buffers any more, then free them."""
        mem, self._mem = self._mem, None
        if mem is None:
            return
        torch.cuda.synchronize(self._device)
        try:
            mem.raise_if_failed(op)
            self._barrier(op, "every rank to finish with the symmetric buffers")
        finally:
            mem.destroy()

    def raise_if_failed(self) -> None:
        if self._mem is not None:
            self._mem.raise_if_failed("a kernel launched earlier")

    def destroy(self) -> None:
        self._release("destroy")

    # ------------------------------------------------------------------------------------------------
    # normal mode

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cuda_dispatch_layout(topk_idx, num_experts, self.context.world_size, self.context.num_sms)

    def _expert_counts_from_gather(self, request: DispatchRequest) -> tuple[torch.Tensor, list[int]]:
        """One count exchange: the ``[R, R]`` row matrix and this rank's padded per-expert receive counts."""
        assert request.num_tokens_per_rank is not None and request.num_tokens_per_expert is not None
        world, rank = self.context.world_size, self.context.rank
        row = torch.cat([request.num_tokens_per_rank.long(), request.num_tokens_per_expert.long()])
        full = gather_count_matrix(self._ctx("dispatch"), row, self._host_device)
        epr = request.num_experts // world
        counts = full[:, world + rank * epr : world + (rank + 1) * epr].sum(dim=0)
        return full[:, :world], pad_to_alignment(counts, request.expert_alignment).tolist()

    def dispatch(self, request: DispatchRequest) -> DispatchOutput:
        x, scales, cached = request.x, request.x_scales, request.handle
        world, rank = self.context.world_size, self.context.rank
        num_tokens, hidden = x.shape
        row_bytes = ops.row_bytes_of(x)
        stream = torch.cuda.current_stream(self._device)
        expert_counts: list[int] = []
        count_on_arrival = False
        send_counts = recv_counts = None
        if cached is None:
            assert request.is_token_in_rank is not None and request.num_tokens_per_rank is not None
            worst = request.num_worst_tokens
            if worst:
                max_rows, num_recv = worst // world, worst
            else:
                matrix = request.rank_matrix
                count_on_arrival = request.topk_idx is not None and not request.async_finish
                if matrix is None or not count_on_arrival:
                    matrix, expert_counts = self._expert_counts_from_gather(request)
                    count_on_arrival = False
                send_counts = tuple(int(v) for v in matrix[rank].tolist())
                recv_counts = tuple(int(v) for v in matrix[:, rank].tolist())
                max_rows, num_recv = int(matrix.max()), sum(recv_counts)
            num_sent = num_tokens * world if worst else sum(send_counts)
            plan = ops.make_plan(request.is_token_in_rank.to(self._device), request.num_tokens_per_rank.to(self._device),
                                 max_rows, num_recv, request.num_sms, stream, num_sent=num_sent,
                                 num_local_experts=request.num_experts // world if count_on_arrival else 0)
        else:
            plan = cached.backend_state
            worst = cached.num_worst_tokens
        num_scales = 0 if scales is None else scales.shape[1]
        num_topk = 0 if request.topk_idx is None else request.topk_idx.shape[1]
        record = ops.dispatch_record_bytes(row_bytes, num_scales, num_topk)
        mem = self._buffers("dispatch", max(plan.max_rows, 1) * record, 0)
        out = ops.allocate_dispatch_outputs(plan, x, num_scales, num_topk, request.topk_weights is not None,
                                            with_src=cached is None, padded=worst > 0)
        ops.dispatch_send(mem, plan, x, scales, request.topk_idx, request.topk_weights,
                          request.num_experts // world, request.num_sms, stream)
        ops.dispatch_recv(mem, plan, out, request.num_sms, stream)

        if cached is None:
            if worst:  # no counts on the host: -1 throughout, as the torch backend's worst-case handle has
                prefix = torch.full((world, world), -1, dtype=torch.int32, device=self._device)
            else:
                prefix = matrix.to(torch.int64).cumsum(dim=0).to(self._device, torch.int32)
            assert out.recv_src_idx is not None and out.recv_src_rank is not None and plan.send_token_idx is not None
            handle = DispatchHandle(
                buffer_id=self.context.buffer_id,
                backend=self.name,
                num_ranks=world,
                num_experts=request.num_experts,
                num_tokens=num_tokens,
                hidden=hidden,
                num_topk=num_topk,
                is_token_in_rank=plan.is_token_in_rank,
                num_tokens_per_rank=plan.num_tokens_per_rank,
                rank_prefix_matrix=prefix,
                send_token_idx=plan.send_token_idx,
                recv_src_idx=out.recv_src_idx,
                recv_src_rank=out.recv_src_rank,
                num_recv_tokens=plan.num_recv_rows,
                send_counts=send_counts,
                recv_counts=recv_counts,
                num_recv_tokens_per_expert_list=expert_counts,
                expert_alignment=request.expert_alignment,
                num_worst_tokens=worst,
                backend_state=plan,
            )
        else:
            handle = cached
        comm = self._stream

        def finish() -> None:
            if count_on_arrival:
                comm.synchronize()
                mem.raise_if_failed("dispatch")
                assert out.recv_expert_counts is not None  # counted by the receive kernel
                counts = out.recv_expert_counts.to("cpu", torch.int64)
                expert_counts.extend(pad_to_alignment(counts, request.expert_alignment).tolist())
            else:
                mem.raise_if_failed("dispatch")

        return DispatchOutput(
            recv_x=out.recv_x,
            recv_x_scales=out.recv_scales,
            recv_topk_idx=out.recv_topk_idx,
            recv_topk_weights=out.recv_topk_weights,
            handle=handle,
            finish=finish,
        )

    def combine(self, request: CombineRequest) -> CombineOutput:
        handle, x, weights = request.handle, request.x, request.topk_weights
        plan: ops.RoutingPlan = handle.backend_state
        ops.dtype_code(x.dtype)
        num_topk = 0 if weights is None else weights.shape[1]
        record = ops.combine_record_bytes(ops.row_bytes_of(x), num_topk)
        mem = self._buffers("combine", 0, max(plan.max_rows, 1) * record)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        bias = tuple(None if b is None else b.to(self._device, acc).contiguous() for b in request.bias)
        out = torch.empty(handle.num_tokens, x.shape[1], dtype=x.dtype, device=self._device)
        out_weights = None if weights is None else torch.empty(handle.num_tokens, num_topk, dtype=torch.float32, device=self._device)
        stream = torch.cuda.current_stream(self._device)
        ops.combine_send(mem, plan, x, weights, request.num_sms, stream)
        ops.combine_recv(mem, plan, out, out_weights, (bias[0], bias[1]), request.num_sms, stream)
        return CombineOutput(combined_x=out, combined_topk_weights=out_weights, finish=lambda: mem.raise_if_failed("combine"))

    # ------------------------------------------------------------------------------------------------
    # low-latency mode: the same kernels in worst-case form (M rows per source, no host synchronisation),
    # then an expert-major rearrangement on the device

    def _on_own_stream(self) -> Any:
        """A context running on the communication stream after the caller's current stream."""
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        return torch.cuda.stream(self._stream)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        return_recv_hook: bool,
    ) -> LowLatencyDispatchOutput:
        world, sms = self.context.world_size, self.context.num_sms
        max_tokens = num_max_dispatch_tokens_per_rank
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        epr = num_experts // world
        slots = world * max_tokens
        per_rank, _, in_rank = self.get_dispatch_layout(topk_idx, num_experts)
        # With FP8 the send kernel casts each row as it sends it (one read of x, no FP8 copy in between).
        wire_dtype = torch.float8_e4m3fn if use_fp8 else x.dtype
        num_scales = num_scale_blocks(hidden) if use_fp8 else 0
        stream = torch.cuda.current_stream(self._device)
        plan = ops.make_plan(in_rank, per_rank, max_tokens, slots, sms, stream)
        record = ops.dispatch_record_bytes(ops.row_bytes_of(x, wire_dtype), num_scales, num_topk)
        # Sized for the combine of these rows too (bf16 expert outputs, one per choice), so that a combine does
        # not reallocate the buffers while a hooked receive of this dispatch may still be pending.
        mem = self._buffers("low_latency_dispatch", max_tokens * record, max_tokens * num_topk * hidden * 2)
        rows = ops.allocate_dispatch_outputs(plan, x, num_scales, num_topk, False, with_src=True, padded=True, dtype=wire_dtype)
        ops.dispatch_send(mem, plan, x, None, topk_idx, None, epr, sms, stream, cast_fp8=use_fp8)

        dev = self._device
        recv_x = torch.empty(epr, slots, hidden, dtype=wire_dtype, device=dev)
        recv_scales = torch.empty(epr, slots, num_scales, dtype=torch.float32, device=dev) if use_fp8 else None
        recv_count = torch.empty(epr, dtype=torch.int32, device=dev)
        src_token_idx = torch.empty(epr, slots, dtype=torch.int32, device=dev)
        src_rank = torch.empty(epr, slots, dtype=torch.int32, device=dev)
        layout_range = torch.empty(epr, world, 2, dtype=torch.int32, device=dev)
        slot_of = torch.empty(slots, num_topk, dtype=torch.int64, device=dev)
        handle = LowLatencyHandle(
            buffer_id=self.context.buffer_id, backend=self.name, num_ranks=world, num_experts=num_experts,
            num_max_dispatch_tokens_per_rank=max_tokens, num_tokens=num_tokens, hidden=hidden, num_topk=num_topk,
            src_token_idx=src_token_idx, src_rank=src_rank, layout_range=layout_range,
            backend_state={"plan": plan, "rows": rows, "slot_of": slot_of},
        )

        def receive() -> None:
            with self._on_own_stream():
                ops.dispatch_recv(mem, plan, rows, sms, self._stream)
                ops.expert_major(rows, recv_x, recv_scales, recv_count, src_token_idx, src_rank, layout_range, slot_of,
                                 sms, self._stream)
            torch.cuda.current_stream(dev).wait_stream(self._stream)
            mem.raise_if_failed("low_latency_dispatch")

        hook = None
        if return_recv_hook:
            hook = receive
        else:
            receive()
        return LowLatencyDispatchOutput(recv_x=recv_x, recv_x_scales=recv_scales, recv_count=recv_count, handle=handle, hook=hook)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        return_recv_hook: bool,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        sms, dev = self.context.num_sms, self._device
        state = handle.backend_state
        rows: ops.DispatchOutputs = state["rows"]
        max_tokens, hidden, num_topk = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_topk
        # One round trip: every (token, choice) output row goes back to the token's rank, which weights them.
        mem = self._buffers("low_latency_combine", 0, max_tokens * num_topk * hidden * x.element_size())
        stream = torch.cuda.current_stream(dev)
        ops.low_latency_combine_send(mem, x.reshape(-1, hidden), state["slot_of"], rows, max_tokens, sms, stream)
        combined = out if out is not None else torch.empty(handle.num_tokens, hidden, dtype=x.dtype, device=dev)
        weights = topk_weights.to(torch.float32).contiguous()

        def receive() -> None:
            with self._on_own_stream():
                ops.low_latency_combine_recv(mem, topk_idx, weights, combined, handle.num_experts // handle.num_ranks,
                                             max_tokens, sms, self._stream)
            torch.cuda.current_stream(dev).wait_stream(self._stream)
            mem.raise_if_failed("low_latency_combine")

        if return_recv_hook:
            return combined, receive
        receive()
        return combined, None
