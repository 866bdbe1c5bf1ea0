"""Single-GPU multi-rank mode: R ranks of the CUDA backend inside one process, on one GPU.

Each emulated rank has its own symmetric buffer, its own stream and the very same kernels as a real rank;
only the peer pointers differ (plain device pointers instead of CUDA IPC mappings). Every rank's send kernel
is issued before any rank's receive kernel, with events joining the streams in between, so no kernel ever
spins on work that is not yet scheduled and the R ranks' kernels run concurrently (R * num_sms blocks).

What it shows: the protocol, the record layout, the flags and epochs, the bytes each kernel moves and what
an SM budget allows. What it cannot show: NVLink bandwidth and latency (every "remote" write is a local HBM
write), contention between independent GPUs, or IPC mapping costs. The multi-process path on one GPU
(tests/gpu/test_cuda_conformance.py, ranks time-sliced by the driver) covers the IPC code instead.

Shapes as in :mod:`moe_comm.backends.cuda_intranode`; lists are indexed by rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_comm.backends import cuda_intranode as ops
from moe_comm.backends.cuda import cuda_dispatch_layout
from moe_comm.backends.cuda_memory import SymmetricBuffer, round_region
from moe_comm.fp8 import num_scale_blocks

__all__ = ["MultiRankEmulator"]


class MultiRankEmulator:
    """``num_ranks`` CUDA-backend ranks in this process.

    Args:
        num_ranks: R, 1 to 8.
        dispatch_region_bytes, combine_region_bytes: bytes of one source's region of each kind (rounded up to
            whole MiB); size them with :meth:`region_bytes_for`.
        device: the GPU (default: the current one).
        timeout_s: bound on every spin wait of the kernels.
    """

    def __init__(
        self,
        num_ranks: int,
        dispatch_region_bytes: int,
        combine_region_bytes: int,
        device: torch.device | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.num_ranks = num_ranks
        self.buffers = SymmetricBuffer.allocate_local(
            num_ranks, self.device, round_region(dispatch_region_bytes), round_region(combine_region_bytes), timeout_s
        )
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(num_ranks)]

    @staticmethod
    def region_bytes_for(max_rows: int, hidden: int, dtype: torch.dtype, num_scales: int, num_topk: int, combine_dtype: torch.dtype) -> tuple[int, int]:
        """``(dispatch_region_bytes, combine_region_bytes)`` for ``max_rows`` rows per (source, destination)."""
        dispatch = ops.dispatch_record_bytes(hidden * dtype.itemsize, num_scales, num_topk)
        combine = ops.combine_record_bytes(hidden * combine_dtype.itemsize, num_topk)
        return max_rows * dispatch, max_rows * combine

    def join(self) -> None:
        """Every rank's stream waits for the work issued so far on every rank's stream."""
        events = [s.record_event() for s in self.streams]
        for stream in self.streams:
            for event in events:
                stream.wait_event(event)

    def follow(self, stream: torch.cuda.Stream) -> None:
        """Every rank's stream waits for the work issued so far on ``stream`` (e.g. the caller's)."""
        event = stream.record_event()
        for s in self.streams:
            s.wait_event(event)

    def lead(self, stream: torch.cuda.Stream) -> None:
        """``stream`` waits for the work issued so far on every rank's stream."""
        for s in self.streams:
            stream.wait_event(s.record_event())

    def destroy(self) -> None:
        torch.cuda.synchronize(self.device)
        for buf in self.buffers:
            buf.destroy()

    def raise_if_failed(self, op: str) -> None:
        for buf in self.buffers:
            buf.raise_if_failed(op)

    # ------------------------------------------------------------------------------------------------

    def plan(self, topk_idx: Sequence[torch.Tensor], num_experts: int, num_sms: int = 20) -> list[ops.RoutingPlan]:
        """Layouts (on device) and routing plans of every rank (reads the count matrix back once)."""
        r = self.num_ranks
        layouts = [cuda_dispatch_layout(idx, num_experts, r, num_sms) for idx in topk_idx]
        matrix = torch.stack([per_rank for per_rank, _, _ in layouts]).cpu()  # [src, dst]
        max_rows = int(matrix.max()) if matrix.numel() else 0
        stream = torch.cuda.current_stream(self.device)
        return [ops.make_plan(in_rank, per_rank, max_rows, int(matrix[:, d].sum()), num_sms, stream)
                for d, (per_rank, _, in_rank) in enumerate(layouts)]

    def dispatch(
        self,
        plans: Sequence[ops.RoutingPlan],
        x: Sequence[torch.Tensor],
        x_scales: Sequence[torch.Tensor | None] | None = None,
        topk_idx: Sequence[torch.Tensor | None] | None = None,
        topk_weights: Sequence[torch.Tensor | None] | None = None,
        num_experts: int = 0,
        num_sms: int = 20,
        outputs: Sequence[ops.DispatchOutputs] | None = None,
        cast_fp8: bool = False,
    ) -> list[ops.DispatchOutputs]:
        """Dispatch every rank's ``x[r] [T_r, H]``; returns each rank's receive outputs.

        With ``cast_fp8`` (no ``x_scales``), the send kernels cast the bf16/fp16/fp32 rows to FP8 with per-128-
        channel scales as they send them (the outputs are FP8 rows and their scales). The work runs on the
        ranks' streams after the caller's current stream; call :meth:`lead` (or synchronise) before using the
        outputs."""
        r = self.num_ranks
        none: list[None] = [None] * r
        scales = list(x_scales) if x_scales is not None else none
        idx = list(topk_idx) if topk_idx is not None else none
        weights = list(topk_weights) if topk_weights is not None else none
        if outputs is None:
            outputs = [
                ops.allocate_dispatch_outputs(plans[d], x[d], self._num_scales(x[d], scales[d], cast_fp8),
                                              0 if idx[d] is None else idx[d].shape[1], weights[d] is not None,
                                              with_src=True, padded=False, dtype=torch.float8_e4m3fn if cast_fp8 else None)
                for d in range(r)
            ]
        self.follow(torch.cuda.current_stream(self.device))  # inputs were made on the caller's stream
        self.join()
        for rank in range(r):
            with torch.cuda.stream(self.streams[rank]):
                ops.dispatch_send(self.buffers[rank], plans[rank], x[rank], scales[rank], idx[rank],
                                  weights[rank], num_experts // r if num_experts else 1, num_sms, self.streams[rank],
                                  cast_fp8=cast_fp8)
        self.join()
        for rank in range(r):
            with torch.cuda.stream(self.streams[rank]):
                ops.dispatch_recv(self.buffers[rank], plans[rank], outputs[rank], num_sms, self.streams[rank])
        return list(outputs)

    @staticmethod
    def _num_scales(x: torch.Tensor, scales: torch.Tensor | None, cast_fp8: bool) -> int:
        if cast_fp8:
            return num_scale_blocks(x.shape[1])
        return 0 if scales is None else scales.shape[1]

    def combine(
        self,
        plans: Sequence[ops.RoutingPlan],
        x: Sequence[torch.Tensor],
        topk_weights: Sequence[torch.Tensor] | None = None,
        num_sms: int = 20,
        outputs: Sequence[torch.Tensor] | None = None,
        weight_outputs: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Combine every rank's received rows ``x[r] [N_r, H]`` back to ``[T_r, H]`` (issued, not synchronised).

        With ``topk_weights[r] [N_r, K]`` (float32) the weights travel with the rows and are summed per token
        like them, into ``weight_outputs[r] [T_r, K]`` (float32, required then)."""
        r = self.num_ranks
        if (topk_weights is None) != (weight_outputs is None):
            raise ValueError("weight_outputs: give it exactly when topk_weights is given (one [T_r, K] float32 "
                             "tensor per rank for the combined weights)")
        weights: list[torch.Tensor | None] = list(topk_weights) if topk_weights is not None else [None] * r
        weights_out: list[torch.Tensor | None] = list(weight_outputs) if weight_outputs is not None else [None] * r
        if outputs is None:
            outputs = [torch.empty(p.is_token_in_rank.shape[0], x[d].shape[1], dtype=x[d].dtype, device=self.device) for d, p in enumerate(plans)]
        self.follow(torch.cuda.current_stream(self.device))
        self.join()
        for rank in range(r):
            with torch.cuda.stream(self.streams[rank]):
                ops.combine_send(self.buffers[rank], plans[rank], x[rank], weights[rank], num_sms, self.streams[rank])
        self.join()
        for rank in range(r):
            with torch.cuda.stream(self.streams[rank]):
                ops.combine_recv(self.buffers[rank], plans[rank], outputs[rank], weights_out[rank], (None, None),
                                 num_sms, self.streams[rank])
        return list(outputs)
