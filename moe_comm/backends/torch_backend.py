"""The portable backend: dispatch and combine built on ``torch.distributed`` collectives.

Runs wherever ``torch.distributed`` runs (gloo on CPU, NCCL on GPUs, one node or many) and is the
semantic reference of every other backend.

Normal mode moves each token once per destination rank:

1. counts: one small ``all_gather`` of every rank's ``num_tokens_per_rank`` and ``num_tokens_per_expert``
   (skipped when the Buffer's agreement step already gathered them, and for a cached dispatch);
2. payload: point-to-point messages per peer (:class:`moe_comm.collectives.PeerExchange`; one
   ``batch_isend_irecv`` group on NCCL). Receives are posted first, straight into the slice of ``recv_x``
   that holds that source's rows, so nothing is copied on arrival. The small side channel (source token
   index, top-k ids and weights, FP8 scales: packed per token, gathered with the rows' index) leaves
   first; then each peer's rows go out as soon as they are gathered, while the next peer's are gathered.
   This rank's own rows never touch the transport: they are gathered straight into place.

Combine returns one row per (token, rank) with the mirrored ``all_to_all_single``; the token owner sums
them in rank order in float32 (float64 for float64), on the CPU in one compiled pass (or ``embedding_bag``
without the extension), on a GPU with one ``index_add_`` per rank; all bitwise the same
(:mod:`moe_comm.backends.torch_reduce`).

Worst-case mode (``num_worst_tokens > 0``) never reads counts on the host: every rank sends each peer a
fixed block of ``C = num_worst_tokens // R`` rows (valid rows first, then filler) with equal-split
collectives, and the receiver compacts on the device. It moves ``R * C`` rows per rank whatever the
routing: the price of static shapes without a custom kernel.

Low-latency mode (static shapes, for decode) is :mod:`moe_comm.backends.torch_low_latency`.

Legend: T tokens, H hidden, K top-k, R ranks, E experts, E_local = E / R, S sent rows, N received rows,
C worst-case block rows, M max tokens per rank (low-latency).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_comm import cpu_kernels, host_memory
from moe_comm.backends import torch_low_latency, torch_reduce
from moe_comm.backends.base import (
    BackendContext,
    CombineOutput,
    CombineRequest,
    CommBackend,
    DispatchOutput,
    DispatchRequest,
    LowLatencyDispatchOutput,
)
from moe_comm.backends.torch_staging import ScratchPool, SideChannel, row_offsets, row_ranges
from moe_comm.collectives import PeerExchange, StepContext, all_gather_rows, all_to_all_rows, wait_all
from moe_comm.layout import compute_dispatch_layout, pad_to_alignment
from moe_comm.types import DispatchHandle, LowLatencyHandle

__all__ = ["TorchBackend", "gather_count_matrix"]


# PeerExchange channels: rows and their side channel match separately between two ranks.
_ROW_CHANNEL = 0
_SIDE_CHANNEL = 1


def gather_count_matrix(ctx: StepContext, row: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-gather one int64 row per rank; return the ``[R, len(row)]`` matrix on the host."""
    world = dist.get_world_size(ctx.group)
    local = row.to(device=device, dtype=torch.int64).reshape(1, -1)
    gathered = torch.empty(world, local.shape[1], dtype=torch.int64, device=device)
    work = all_gather_rows(ctx, gathered, local)
    wait_all(ctx, [work], "count exchange", spin=True)
    return gathered.cpu()


class TorchBackend(CommBackend):
    """Dispatch/combine over ``torch.distributed`` (``backend="torch"``); see the module docstring."""

    name = "torch"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._scratch = ScratchPool()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not dist.is_available():
            return False, "torch was built without torch.distributed"
        return True, "torch.distributed collectives (gloo or NCCL)"

    # ------------------------------------------------------------------------------------------------
    # helpers

    def _ctx(self, op: str) -> StepContext:
        c = self.context
        return StepContext(c.group, c.rank, op, c.timeout_s)

    @property
    def _world(self) -> int:
        return self.context.world_size

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return compute_dispatch_layout(topk_idx, num_experts, self._world)

    def _recv_expert_counts(self, matrix: torch.Tensor, num_experts: int, alignment: int) -> list[int]:
        experts_per_rank = num_experts // self._world
        start = self._world + self.context.rank * experts_per_rank
        counts = matrix[:, start : start + experts_per_rank].sum(dim=0)
        return pad_to_alignment(counts, alignment).tolist()

    def _side_fields(self, request: DispatchRequest, with_src: bool) -> list[tuple[str, torch.dtype, int]]:
        fields: list[tuple[str, torch.dtype, int]] = []
        if with_src:
            fields.append(("src_idx", torch.int32, 1))
        if request.topk_idx is not None:
            # Expert ids travel as int32: half the bytes of the caller's int64.
            fields.append(("topk_idx", torch.int32, request.topk_idx.shape[1]))
        if request.topk_weights is not None:
            fields.append(("topk_weights", torch.float32, request.topk_weights.shape[1]))
        if request.x_scales is not None:
            fields.append(("scales", torch.float32, request.x_scales.shape[1]))
        return fields

    def _unpack_topk(
        self,
        side: SideChannel,
        packed: torch.Tensor,
        request: DispatchRequest,
        recv_topk_idx: torch.Tensor | None,
        recv_topk_weights: torch.Tensor | None,
        row_valid: torch.Tensor | None,
        count_experts: bool = False,
    ) -> torch.Tensor | None:
        """Fill the received top-k outputs in place: local expert ids, weights zeroed elsewhere.

        Returns:
            With ``count_experts``, ``[experts_per_rank]`` int64: the received (row, k) entries naming each
            local expert; else ``None`` (also without top-k ids).
        """
        assert recv_topk_idx is not None or recv_topk_weights is None, "the Buffer accepts topk_weights only with topk_idx"
        if recv_topk_idx is None:
            return None
        experts_per_rank = request.num_experts // self._world
        ids = side.view(packed, "topk_idx")
        weights = side.view(packed, "topk_weights") if recv_topk_weights is not None else None
        if row_valid is None and packed.device.type == "cpu" and cpu_kernels.available()[0]:
            counts = cpu_kernels.localize_topk(
                ids, weights, self.context.rank * experts_per_rank, experts_per_rank, recv_topk_idx, recv_topk_weights
            )
            return counts if count_experts else None
        shifted = self._local_expert_ids_plus_one(ids, request.num_experts)
        if row_valid is not None:
            shifted.view(recv_topk_idx.shape).mul_(row_valid.unsqueeze(1))
        torch.sub(shifted.view(recv_topk_idx.shape), 1, out=recv_topk_idx)
        if recv_topk_weights is not None and weights is not None:
            zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
            torch.where(shifted.view(recv_topk_weights.shape) > 0, weights, zero, out=recv_topk_weights)
        if not count_experts:
            return None
        # Ids shifted by one: experts that are not local land in bin 0, no boolean mask needed.
        return torch.bincount(shifted, minlength=experts_per_rank + 1)[1:]

    def _local_expert_ids_plus_one(self, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``[N, K]`` global ids (any integer dtype) -> flat ``[N * K]`` int64 local id + 1, 0 elsewhere.

        Same values as :func:`moe_comm.layout.local_expert_ids` plus one (ids outside ``[0, E)`` give 0),
        with one table lookup instead of five elementwise passes.
        """
        experts_per_rank = num_experts // self._world
        start = self.context.rank * experts_per_rank
        # Entry i + 1 maps global id i; entry 0 catches ids < 0 and entry E + 1 ids >= E (after clamping).
        table = torch.zeros(num_experts + 2, dtype=torch.int64, device=topk_idx.device)
        table[start + 1 : start + 1 + experts_per_rank] = torch.arange(1, experts_per_rank + 1, dtype=torch.int64, device=topk_idx.device)
        shifted = (topk_idx + 1).clamp_(0, num_experts + 1).reshape(-1)
        return table.index_select(0, shifted)

    # ------------------------------------------------------------------------------------------------
    # normal mode, exact sizes

    def dispatch(self, request: DispatchRequest) -> DispatchOutput:
        if request.num_worst_tokens > 0:
            return self._dispatch_worst_case(request)
        return self._dispatch_exact(request)

    def _dispatch_exact(self, request: DispatchRequest) -> DispatchOutput:
        ctx = self._ctx("dispatch")
        x = request.x
        device = x.device
        num_tokens, hidden = x.shape
        world, rank = self._world, self.context.rank
        cached = request.handle

        # Per-expert received counts: from the count exchange when they must be known before the payload
        # arrives (asynchronous completion, or no top-k to count), else from the received top-k ids.
        count_experts_on_arrival = False
        if cached is None:
            assert request.is_token_in_rank is not None and request.num_tokens_per_rank is not None
            assert request.num_tokens_per_expert is not None
            matrix = request.rank_matrix
            expert_counts: list[int] = []
            count_experts_on_arrival = request.topk_idx is not None and not request.async_finish
            if matrix is None or not count_experts_on_arrival:
                row = torch.cat([request.num_tokens_per_rank.long(), request.num_tokens_per_expert.long()])
                full = gather_count_matrix(ctx, row, device)
                matrix = full[:, :world]
                expert_counts = self._recv_expert_counts(full, request.num_experts, request.expert_alignment)
                count_experts_on_arrival = False
            send_counts = tuple(matrix[rank, :world].tolist())
            recv_counts = tuple(matrix[:, rank].tolist())
            rank_prefix_matrix = matrix[:, :world].cumsum(dim=0).to(device=device, dtype=torch.int32)
            send_token_idx = request.is_token_in_rank.t().nonzero()[:, 1].contiguous()
        else:
            assert cached.send_counts is not None and cached.recv_counts is not None
            send_counts, recv_counts = cached.send_counts, cached.recv_counts
            send_token_idx = cached.send_token_idx
            expert_counts = cached.num_recv_tokens_per_expert_list

        num_recv = sum(recv_counts)
        recv_x = host_memory.empty(num_recv, hidden, dtype=x.dtype, device=device)
        send_at, recv_at = row_offsets(send_counts), row_offsets(recv_counts)
        peers = [(rank + step) % world for step in range(1, world)]
        exchange = PeerExchange(ctx)

        fields = self._side_fields(request, with_src=cached is None)
        side = SideChannel(fields) if fields else None
        send_side = recv_side = None
        if side is not None:
            values = {
                name: tensor
                for name, tensor in (
                    ("topk_idx", request.topk_idx),
                    ("topk_weights", request.topk_weights),
                    ("scales", request.x_scales),
                )
                if tensor is not None
            }
            send_side = side.pack_tokens(num_tokens, values, device).index_select(0, send_token_idx)
            recv_side = torch.empty(num_recv, side.width, dtype=torch.uint8, device=device)

        # Receives first, straight into the outputs: the rows of one source are one slice of recv_x.
        for peer in peers:
            lo, hi = recv_at[peer], recv_at[peer + 1]
            if hi > lo:
                if recv_side is not None:
                    exchange.recv(recv_side[lo:hi], peer, _SIDE_CHANNEL)
                exchange.recv(recv_x[lo:hi], peer, _ROW_CHANNEL)
        # The small side channel leaves first; then each peer's rows as soon as they are gathered, while the
        # next peer's are gathered.
        if send_side is not None:
            for peer in peers:
                lo, hi = send_at[peer], send_at[peer + 1]
                if hi > lo:
                    exchange.send(send_side[lo:hi], peer, _SIDE_CHANNEL)
        staged_x = self._scratch.take((sum(send_counts) - send_counts[rank], hidden), x.dtype, device)
        staged_at = 0
        for peer in peers:
            lo, hi = send_at[peer], send_at[peer + 1]
            if hi == lo:
                continue
            rows = staged_x[staged_at : staged_at + hi - lo]
            staged_at += hi - lo
            torch.index_select(x, 0, send_token_idx[lo:hi], out=rows)
            exchange.send(rows, peer, _ROW_CHANNEL)
        exchange.start()
        # This rank's own rows never touch the transport: gathered straight into place.
        lo, hi, own = send_at[rank], send_at[rank + 1], recv_at[rank]
        torch.index_select(x, 0, send_token_idx[lo:hi], out=recv_x[own : own + hi - lo])
        if recv_side is not None and send_side is not None:
            recv_side[own : own + hi - lo].copy_(send_side[lo:hi])

        k = request.topk_idx.shape[1] if request.topk_idx is not None else 0
        recv_topk_idx = torch.empty(num_recv, k, dtype=torch.int64, device=device) if request.topk_idx is not None else None
        recv_topk_weights = (
            torch.empty(num_recv, request.topk_weights.shape[1], dtype=torch.float32, device=device)
            if request.topk_weights is not None
            else None
        )
        recv_scales = (
            torch.empty(num_recv, request.x_scales.shape[1], dtype=torch.float32, device=device)
            if request.x_scales is not None
            else None
        )

        if cached is None:
            recv_src_idx = torch.empty(num_recv, dtype=torch.int32, device=device)
            recv_src_rank = torch.repeat_interleave(
                torch.arange(world, dtype=torch.int32, device=device),
                torch.tensor(recv_counts, dtype=torch.int64, device=device),
                output_size=num_recv,
            )
            handle = DispatchHandle(
                buffer_id=self.context.buffer_id,
                backend=self.name,
                num_ranks=world,
                num_experts=request.num_experts,
                num_tokens=num_tokens,
                hidden=hidden,
                num_topk=k,
                is_token_in_rank=request.is_token_in_rank,
                num_tokens_per_rank=request.num_tokens_per_rank.to(torch.int32),
                rank_prefix_matrix=rank_prefix_matrix,
                send_token_idx=send_token_idx,
                recv_src_idx=recv_src_idx,
                recv_src_rank=recv_src_rank,
                num_recv_tokens=num_recv,
                send_counts=send_counts,
                recv_counts=recv_counts,
                num_recv_tokens_per_expert_list=expert_counts,
                expert_alignment=request.expert_alignment,
                num_worst_tokens=0,
            )
        else:
            handle = cached

        def finish() -> None:
            exchange.wait_recvs(_ROW_CHANNEL, "payload rows")
            if side is not None and recv_side is not None:
                # Sent before the rows, so it has landed: waiting on it first would cost this thread one more
                # wake-up (a millisecond when ranks share cores) to overlap less than that of unpacking.
                exchange.wait_recvs(_SIDE_CHANNEL, "side channel (token index, top-k, scales)")
                unpack_side(side, recv_side)
            exchange.wait_sends("payload rows (sends)")
            self._scratch.give(staged_x)

        def unpack_side(side: SideChannel, recv_side: torch.Tensor) -> None:
            if cached is None:
                handle.recv_src_idx.copy_(side.view(recv_side, "src_idx").squeeze(1))
            if recv_scales is not None:
                recv_scales.copy_(side.view(recv_side, "scales"))
            counts = self._unpack_topk(
                side, recv_side, request, recv_topk_idx, recv_topk_weights, None, count_experts_on_arrival
            )
            if count_experts_on_arrival:
                assert counts is not None
                expert_counts.extend(pad_to_alignment(counts, request.expert_alignment).tolist())

        return DispatchOutput(
            recv_x=recv_x,
            recv_x_scales=recv_scales,
            recv_topk_idx=recv_topk_idx,
            recv_topk_weights=recv_topk_weights,
            handle=handle,
            finish=finish,
        )

    # ------------------------------------------------------------------------------------------------
    # worst-case mode: fixed blocks, no host synchronisation

    def _dispatch_worst_case(self, request: DispatchRequest) -> DispatchOutput:
        ctx = self._ctx("dispatch")
        x = request.x
        device = x.device
        num_tokens, hidden = x.shape
        world = self._world
        block = request.num_worst_tokens // world
        cached = request.handle

        if cached is None:
            assert request.is_token_in_rank is not None and request.num_tokens_per_rank is not None
            # Stable sort puts, for every destination, its tokens first and in token order.
            order = torch.argsort((~request.is_token_in_rank).t().to(torch.int8), dim=1, stable=True)
            if num_tokens < block:
                order = torch.nn.functional.pad(order, (0, block - num_tokens))
            block_token_idx = order[:, :block].contiguous()  # [R, C]
            block_valid = torch.arange(block, device=device).unsqueeze(0) < request.num_tokens_per_rank.unsqueeze(1).to(device)
        else:
            block_token_idx = cached.backend_state["block_token_idx"]
            block_valid = cached.backend_state["block_valid"]

        flat_idx = block_token_idx.flatten()
        if num_tokens == 0:
            send_x = torch.zeros(world * block, hidden, dtype=x.dtype, device=device)
        else:
            send_x = x.index_select(0, flat_idx)
        recv_blocks = host_memory.empty(world * block, hidden, dtype=x.dtype, device=device)
        works = [all_to_all_rows(ctx, recv_blocks, send_x, None, None)]

        fields = self._side_fields(request, with_src=cached is None)
        side = SideChannel(fields) if fields else None
        recv_side = None
        if side is not None:
            values: dict[str, torch.Tensor] = {}
            if cached is None:
                src = torch.where(block_valid, block_token_idx, torch.full_like(block_token_idx, -1))
                values["src_idx"] = src.flatten().to(torch.int32).unsqueeze(1)
            for name, tensor in (
                ("topk_idx", request.topk_idx),
                ("topk_weights", request.topk_weights),
                ("scales", request.x_scales),
            ):
                if tensor is not None:
                    values[name] = (
                        tensor.index_select(0, flat_idx)
                        if num_tokens
                        else torch.zeros(world * block, *tensor.shape[1:], dtype=tensor.dtype, device=device)
                    )
            send_side = side.pack(world * block, values, device)
            recv_side = torch.empty(world * block, side.width, dtype=torch.uint8, device=device)
            works.append(all_to_all_rows(ctx, recv_side, send_side, None, None))

        rows = request.num_worst_tokens
        k = request.topk_idx.shape[1] if request.topk_idx is not None else 0
        recv_x = host_memory.zeros(rows, hidden, dtype=x.dtype, device=device)
        recv_scales = (
            torch.zeros(rows, request.x_scales.shape[1], dtype=torch.float32, device=device)
            if request.x_scales is not None
            else None
        )
        recv_topk_idx = torch.full((rows, k), -1, dtype=torch.int64, device=device) if request.topk_idx is not None else None
        recv_topk_weights = (
            torch.zeros(rows, request.topk_weights.shape[1], dtype=torch.float32, device=device)
            if request.topk_weights is not None
            else None
        )

        if cached is None:
            state = {
                "block_token_idx": block_token_idx,
                "block_valid": block_valid,
                "block": block,
                # Filled by finish(): which received block row lands on each output row, and back.
                "recv_perm": torch.empty(world * block, dtype=torch.int64, device=device),
                "recv_valid": torch.empty(world * block, dtype=torch.bool, device=device),
            }
            handle = DispatchHandle(
                buffer_id=self.context.buffer_id,
                backend=self.name,
                num_ranks=world,
                num_experts=request.num_experts,
                num_tokens=num_tokens,
                hidden=hidden,
                num_topk=k,
                is_token_in_rank=request.is_token_in_rank,
                num_tokens_per_rank=request.num_tokens_per_rank.to(torch.int32),
                rank_prefix_matrix=torch.full((world, world), -1, dtype=torch.int32, device=device),
                send_token_idx=torch.nonzero_static(
                    request.is_token_in_rank.t(), size=num_tokens * world, fill_value=-1
                )[:, 1].contiguous(),
                recv_src_idx=torch.full((rows,), -1, dtype=torch.int32, device=device),
                recv_src_rank=torch.full((rows,), -1, dtype=torch.int32, device=device),
                num_recv_tokens=rows,
                send_counts=None,
                recv_counts=None,
                num_recv_tokens_per_expert_list=[],
                expert_alignment=request.expert_alignment,
                num_worst_tokens=rows,
                backend_state=state,
            )
        else:
            handle = cached
            state = cached.backend_state

        def finish() -> None:
            wait_all(ctx, works, "payload all_to_all (worst-case blocks)")
            used = min(world * block, rows)
            if cached is None:
                assert side is not None and recv_side is not None
                src = side.view(recv_side, "src_idx").squeeze(1)
                valid = src >= 0
                perm = torch.argsort((~valid).to(torch.int8), stable=True)
                state["recv_perm"].copy_(perm)
                state["recv_valid"].copy_(valid[perm])
                handle.recv_src_idx[:used].copy_(src[perm][:used])
                src_rank = torch.div(perm, block, rounding_mode="floor").to(torch.int32)
                handle.recv_src_rank[:used].copy_(torch.where(valid[perm], src_rank, -1)[:used])
            perm = state["recv_perm"][:used]
            row_valid = state["recv_valid"][:used]
            recv_x[:used] = recv_blocks.index_select(0, perm)
            if side is not None and recv_side is not None:
                sorted_side = recv_side.index_select(0, perm)
                if recv_scales is not None:
                    recv_scales[:used] = side.view(sorted_side, "scales")
                self._unpack_topk(
                    side,
                    sorted_side,
                    request,
                    None if recv_topk_idx is None else recv_topk_idx[:used],
                    None if recv_topk_weights is None else recv_topk_weights[:used],
                    row_valid,
                )

        return DispatchOutput(
            recv_x=recv_x,
            recv_x_scales=recv_scales,
            recv_topk_idx=recv_topk_idx,
            recv_topk_weights=recv_topk_weights,
            handle=handle,
            finish=finish,
        )

    # ------------------------------------------------------------------------------------------------
    # combine

    def combine(self, request: CombineRequest) -> CombineOutput:
        handle = request.handle
        if handle.num_worst_tokens > 0:
            return self._combine_worst_case(request)
        ctx = self._ctx("combine")
        x = request.x
        device = x.device
        assert handle.send_counts is not None and handle.recv_counts is not None
        send_counts, recv_counts = handle.send_counts, handle.recv_counts
        num_sent = sum(send_counts)
        # One spare row after the received ones: the padding row of the CPU reduction's bags (never read).
        back_x = self._scratch.take((num_sent + 1, x.shape[1]), x.dtype, device)
        works = [all_to_all_rows(ctx, back_x[:num_sent], x, send_counts, recv_counts)]
        back_w = None
        if request.topk_weights is not None:
            back_w = torch.empty(num_sent, request.topk_weights.shape[1], dtype=torch.float32, device=device)
            works.append(all_to_all_rows(ctx, back_w, request.topk_weights, send_counts, recv_counts))
        segments = row_ranges(send_counts)
        token_of_row = handle.send_token_idx
        pieces = [(token_of_row[a:b], a, b) for a, b in segments]
        if device.type != "cpu":
            reduce = torch_reduce.reduce_at_source
        elif cpu_kernels.available()[0]:
            reduce = torch_reduce.reduce_compiled
        else:
            reduce = torch_reduce.reduce_in_bags
        return reduce(ctx, works, request, back_x, back_w, pieces, "payload all_to_all", self._scratch)

    def _combine_worst_case(self, request: CombineRequest) -> CombineOutput:
        ctx = self._ctx("combine")
        handle = request.handle
        state = handle.backend_state
        x = request.x
        device = x.device
        world, block = self._world, state["block"]
        rows = handle.num_worst_tokens
        used = min(world * block, rows)
        # Block slot -> output row that holds it (inverse of the receive permutation).
        inverse = torch.empty(world * block, dtype=torch.int64, device=device)
        inverse[state["recv_perm"][:used]] = torch.arange(used, device=device)
        if used < world * block:
            inverse[state["recv_perm"][used:]] = 0
        back_x = torch.empty(world * block, x.shape[1], dtype=x.dtype, device=device)
        works = [all_to_all_rows(ctx, back_x, x.index_select(0, inverse), None, None)]
        back_w = None
        if request.topk_weights is not None:
            back_w = torch.empty(world * block, request.topk_weights.shape[1], dtype=torch.float32, device=device)
            works.append(all_to_all_rows(ctx, back_w, request.topk_weights.index_select(0, inverse), None, None))
        num_tokens = handle.num_tokens
        dummy = torch.full_like(state["block_token_idx"], num_tokens)
        targets = torch.where(state["block_valid"], state["block_token_idx"], dummy)
        pieces = [(targets[r], r * block, (r + 1) * block) for r in range(world)]
        return torch_reduce.reduce_at_source(
            ctx, works, request, back_x, back_w, pieces, "payload all_to_all (worst-case blocks)", self._scratch, spare_row=True
        )

    # ------------------------------------------------------------------------------------------------
    # low-latency mode

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        return_recv_hook: bool,
    ) -> LowLatencyDispatchOutput:
        return torch_low_latency.low_latency_dispatch(
            self.context, self.name, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, return_recv_hook
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        return_recv_hook: bool,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        return torch_low_latency.low_latency_combine(self.context, x, topk_idx, topk_weights, handle, return_recv_hook, out)
