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
them in rank order in float32 (float64 for float64). On the CPU it does so token block by token block
with ``embedding_bag``, straight over the received rows (or, with a bias, over an upcast copy of the
block's rows that stays in cache); on a GPU with one ``index_add_`` per rank. All give bitwise the same
results.

Worst-case mode (``num_worst_tokens > 0``) never reads counts on the host: every rank sends each peer a
fixed block of ``C = num_worst_tokens // R`` rows (valid rows first, then filler) with equal-split
collectives, and the receiver compacts on the device. It moves ``R * C`` rows per rank whatever the
routing: the price of static shapes without a custom kernel.

Low-latency mode all-gathers every rank's (optionally FP8) tokens padded to M rows with their top-k
ids, and each rank picks the rows of its local experts into the expert-major layout. Combine sends each
token owner a float32 partial sum of its local experts' weighted outputs. Static shapes throughout.

Legend: T tokens, H hidden, K top-k, R ranks, E experts, E_local = E / R, S sent rows, N received rows,
C worst-case block rows, M max tokens per rank (low-latency).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from moe_comm import cpu_kernels, host_memory
from moe_comm.backends.base import (
    BackendContext,
    CombineOutput,
    CombineRequest,
    CommBackend,
    DispatchOutput,
    DispatchRequest,
    LowLatencyDispatchOutput,
)
from moe_comm.collectives import PeerExchange, StepContext, all_gather_rows, all_to_all_rows, as_bytes, wait_all
from moe_comm.fp8 import FP8_DTYPE, per_token_cast_to_fp8
from moe_comm.layout import compute_dispatch_layout, local_expert_ids, pad_to_alignment
from moe_comm.types import DispatchHandle, LowLatencyHandle

__all__ = ["TorchBackend", "gather_count_matrix"]


# Size of the float32 scratch that combine's reduction upcasts at a time on the CPU.
_CPU_CHUNK_BYTES = 1 << 20

# PeerExchange channels: rows and their side channel match separately between two ranks.
_ROW_CHANNEL = 0
_SIDE_CHANNEL = 1


def _offsets(counts: Sequence[int]) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: where each rank's rows start (and the last one ends)."""
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return bounds


def _sum_weights(back_w: torch.Tensor, pieces: Sequence[tuple[torch.Tensor, int, int]], rows: int) -> torch.Tensor:
    """``[rows, K]`` float32: the returned top-k weights ``back_w`` summed per target row, rank by rank.

    ``pieces`` holds, per rank, the target row of each of its rows and their range in ``back_w``.
    """
    acc_w = torch.zeros(rows, back_w.shape[1], dtype=torch.float32, device=back_w.device)
    for targets, start, stop in pieces:
        if stop > start:
            acc_w.index_add_(0, targets, back_w[start:stop])
    return acc_w


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _bags_round_once_to_nearest_even(dtype: torch.dtype) -> bool:
    """Whether ``embedding_bag(..., padding_idx=...)`` on a CPU table of ``dtype`` sums in float32 and rounds
    once to nearest even, as a cast does.

    Without ``padding_idx`` PyTorch hands bf16/fp16 bags to fbgemm, which rounds exact ties away from zero
    (8% of the elements of a sum of bf16 rows); with it, ATen's own kernel does the float32 sum. That is an
    implementation detail, so it is probed once on a tie: 1 + 2^-8 lies halfway between two bf16 (and, with
    2^-11, two fp16) values, and the even one is 1.
    """
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    table = torch.tensor([[1.0], [half_ulp], [0.0]], dtype=dtype)
    total = torch.nn.functional.embedding_bag(torch.tensor([0, 1]), table, torch.tensor([0]), mode="sum", padding_idx=2)
    return bool(total.item() == 1.0)


def gather_count_matrix(ctx: StepContext, row: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-gather one int64 row per rank; return the ``[R, len(row)]`` matrix on the host."""
    world = dist.get_world_size(ctx.group)
    local = row.to(device=device, dtype=torch.int64).reshape(1, -1)
    gathered = torch.empty(world, local.shape[1], dtype=torch.int64, device=device)
    work = all_gather_rows(ctx, gathered, local)
    wait_all(ctx, [work], "count exchange", spin=True)
    return gathered.cpu()


class _SideChannel:
    """Packs small per-row tensors into one ``[rows, width]`` uint8 tensor and unpacks them again.

    Fields are laid out widest dtype first and the row is padded to 8 bytes, so every field can be
    viewed in place without copies.
    """

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, int]]) -> None:
        order = sorted(fields, key=lambda f: -torch.empty(0, dtype=f[1]).element_size())
        self.fields: list[tuple[str, torch.dtype, int, int]] = []
        offset = 0
        for name, dtype, columns in order:
            self.fields.append((name, dtype, columns, offset))
            offset += torch.empty(0, dtype=dtype).element_size() * columns
        self.width = (offset + 7) // 8 * 8

    def pack(self, rows: int, values: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        packed = torch.zeros(rows, self.width, dtype=torch.uint8, device=device)
        for name, dtype, _, offset in self.fields:
            data = as_bytes(values[name].to(dtype).contiguous())
            packed[:, offset : offset + data.shape[1]] = data
        return packed

    def pack_tokens(self, num_tokens: int, values: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Pack per-token values (``src_idx`` is the token index itself) into ``[T, width]`` uint8.

        Gathering the packed rows afterwards (one ``index_select`` of ``width`` bytes per sent row) is
        cheaper than gathering every field and packing the gathered rows.
        """
        packed = torch.zeros(num_tokens, self.width, dtype=torch.uint8, device=device)
        for name, dtype, columns, offset in self.fields:
            size = torch.empty(0, dtype=dtype).element_size() * columns
            target = packed[:, offset : offset + size].view(dtype)
            if name == "src_idx":
                target.copy_(torch.arange(num_tokens, dtype=dtype, device=device).unsqueeze(1))
            else:
                target.copy_(values[name])
        return packed

    def view(self, packed: torch.Tensor, name: str) -> torch.Tensor:
        for field_name, dtype, columns, offset in self.fields:
            if field_name == name:
                size = torch.empty(0, dtype=dtype).element_size() * columns
                return packed[:, offset : offset + size].view(dtype)
        raise KeyError(name)


class _ScratchPool:
    """Reusable host staging buffers, so large transfers do not page-fault fresh memory on every call.

    Only for CPU tensors (the CUDA caching allocator already reuses memory, and stream-ordered reuse
    needs it). A buffer is taken when an operation is issued and given back when it completes, so
    operations in flight at the same time never share one.
    """

    def __init__(self, keep: int = 6) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous, uninitialised tensor of ``shape`` and ``dtype``."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes + (1 << 16)]
        raw = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else host_memory.empty(nbytes, dtype=torch.uint8)
        return raw[:nbytes].view(dtype).view(shape)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Return buffers from :meth:`take` (the caller no longer reads them)."""
        for t in tensors:
            if t is None or t.device.type != "cpu":
                continue
            base = t._base if t._base is not None else t
            self._free.append(base.view(-1).view(torch.uint8) if base.dtype != torch.uint8 else base.view(-1))
        del self._free[: max(0, len(self._free) - self._keep)]


class TorchBackend(CommBackend):
    """Dispatch/combine over ``torch.distributed`` (``backend="torch"``); see the module docstring."""

    name = "torch"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._scratch = _ScratchPool()

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
        side: _SideChannel,
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
        send_at, recv_at = _offsets(send_counts), _offsets(recv_counts)
        peers = [(rank + step) % world for step in range(1, world)]
        exchange = PeerExchange(ctx)

        fields = self._side_fields(request, with_src=cached is None)
        side = _SideChannel(fields) if fields else None
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

        def unpack_side(side: _SideChannel, recv_side: torch.Tensor) -> None:
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
        side = _SideChannel(fields) if fields else None
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
        segments = self._segments(send_counts)
        token_of_row = handle.send_token_idx
        pieces = [(token_of_row[a:b], a, b) for a, b in segments]
        if device.type != "cpu":
            reduce = self._reduce_at_source
        elif cpu_kernels.available()[0]:
            reduce = self._reduce_compiled
        else:
            reduce = self._reduce_in_bags
        return reduce(ctx, works, request, back_x, back_w, pieces, "payload all_to_all")

    def _reduce_in_bags(
        self,
        ctx: StepContext,
        works: list[dist.Work | None],
        request: CombineRequest,
        back_x: torch.Tensor,
        back_w: torch.Tensor | None,
        pieces: list[tuple[torch.Tensor, int, int]],
        step: str,
    ) -> CombineOutput:
        """Sum every token's returned rows on the CPU, token block by token block, with ``embedding_bag``.

        Rank r returned its rows in token order, so the rows of a block of tokens are one contiguous range
        per rank. The block upcasts those ranges (and its bias rows) into a small accumulation-dtype
        scratch that stays in cache, then one ``embedding_bag`` adds up each token's bag (its ranks' rows in
        rank order, then bias, then the second bias) from the first element on, and the block is rounded
        once into the output. The sums, their order and the rounding are those of
        :meth:`_reduce_at_source` (``0 + row_0 + row_1 + ... + bias``): the results are bitwise the same,
        at about twice the speed of staging the rows and adding them with elementwise ops. Without biases
        the bags index the received rows directly (no upcast copy; half the time again).

        ``back_x`` holds one spare row after the received ones.
        """
        handle, x = request.handle, request.x
        num_tokens, hidden, world = handle.num_tokens, x.shape[1], self._world
        device = x.device
        acc_dtype = _accumulation_dtype(x.dtype)
        biases = [b for b in request.bias if b is not None]
        members = torch.cat(
            [handle.is_token_in_rank.to(device), torch.ones(num_tokens, len(biases), dtype=torch.bool, device=device)], dim=1
        )  # [T, R + biases]: the elements of each token's bag, in summation order
        # Rows of rank r up to token t, shifted by rank r's first row: rank_rows[t, r] is where the block that
        # starts at token t finds rank r's rows; rank_rows[t, R + i] = t places bias i's row in the same way.
        first = torch.tensor(_offsets(handle.send_counts)[:-1] + [0] * len(biases), dtype=torch.int64, device=device)
        rank_rows = torch.zeros(num_tokens + 1, members.shape[1], dtype=torch.int64, device=device)
        torch.cumsum(members, dim=0, out=rank_rows[1:])
        rank_rows.add_(first)
        element_row = rank_rows[:-1][members]
        bag_end = members.sum(dim=1, dtype=torch.int64).cumsum(dim=0)
        # Without biases every bag element is a received row: the bags can index back_x itself and skip the
        # upcast copy, where embedding_bag sums in float32 and rounds once to nearest even on its own.
        reduced = x.dtype in (torch.bfloat16, torch.float16)
        direct = not biases and (not reduced or _bags_round_once_to_nearest_even(x.dtype))
        # Token-major: which rank (or bias) each bag element is from (the upcast path's scratch offsets).
        element_source = None if direct else members.nonzero()[:, 1]
        # Tokens per block, so that what a block writes stays in cache: the direct path's output block
        # (a quarter of the chunk: 128 bf16 tokens of 1024 measured best), or the upcast scratch.
        if direct:
            block = (_CPU_CHUNK_BYTES // 4) // (x.element_size() * max(hidden, 1))
        else:
            block = 2 * _CPU_CHUNK_BYTES // (acc_dtype.itemsize * max(hidden, 1))
        block = min(max(16, block), max(num_tokens, 1))
        starts = list(range(0, num_tokens, block))
        bounds = rank_rows[starts + [num_tokens]].tolist() if num_tokens else []
        element_bounds = [0] + bag_end[[min(s + block, num_tokens) - 1 for s in starts]].tolist() if num_tokens else []
        combined = host_memory.empty(num_tokens, hidden, dtype=x.dtype, device=device)
        combined_w = None
        if back_w is not None:
            combined_w = torch.empty(num_tokens, back_w.shape[1], dtype=torch.float32, device=device)

        def finish_direct() -> None:
            wait_all(ctx, works, step)
            # back_x ends in a spare row no bag names: as padding_idx it keeps bf16/fp16 bags off fbgemm.
            padding = {"padding_idx": back_x.shape[0] - 1} if reduced else {}
            for i, lo in enumerate(starts):
                hi = min(lo + block, num_tokens)
                e0, e1 = element_bounds[i], element_bounds[i + 1]
                if e1 == e0:
                    combined[lo:hi].zero_()
                    continue
                offsets = torch.cat([bag_end.new_zeros(1), bag_end[lo : hi - 1] - e0])
                combined[lo:hi].copy_(torch.nn.functional.embedding_bag(element_row[e0:e1], back_x, offsets, mode="sum", **padding))
            if combined_w is not None and back_w is not None:
                combined_w.copy_(_sum_weights(back_w, pieces, num_tokens))
            self._scratch.give(back_x)

        def finish() -> None:
            wait_all(ctx, works, step)
            sources = [back_x] * world + biases
            scratch = self._scratch.take((members.shape[1] * block, hidden), acc_dtype, device)
            for i, lo in enumerate(starts):
                hi = min(lo + block, num_tokens)
                begin, end = bounds[i], bounds[i + 1]
                shift, base = [], 0
                for source, a, b in zip(sources, begin, end, strict=True):
                    scratch[base : base + b - a].copy_(source[a:b])
                    shift.append(base - a)
                    base += b - a
                e0, e1 = element_bounds[i], element_bounds[i + 1]
                assert element_source is not None
                local = element_row[e0:e1] + torch.tensor(shift, dtype=torch.int64, device=device)[element_source[e0:e1]]
                offsets = torch.cat([bag_end.new_zeros(1), bag_end[lo : hi - 1] - e0])
                if base:
                    combined[lo:hi].copy_(torch.nn.functional.embedding_bag(local, scratch[:base], offsets, mode="sum"))
                else:
                    combined[lo:hi].zero_()
            if combined_w is not None and back_w is not None:
                combined_w.copy_(_sum_weights(back_w, pieces, num_tokens))
            self._scratch.give(scratch, back_x)

        return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish_direct if direct else finish)

    def _reduce_compiled(
        self,
        ctx: StepContext,
        works: list[dist.Work | None],
        request: CombineRequest,
        back_x: torch.Tensor,
        back_w: torch.Tensor | None,
        pieces: list[tuple[torch.Tensor, int, int]],
        step: str,
    ) -> CombineOutput:
        """:meth:`_reduce_in_bags` in one pass of ``moe_comm._cpu``'s ``bag_sum``: the same bags (each token's
        returned rows in rank order), the same float32 sums and rounding, each row read once and each output
        row written once. About twice as fast as ``embedding_bag`` with its ``padding_idx`` (docs)."""
        handle, x = request.handle, request.x
        num_sent = sum(handle.send_counts or ())
        in_rank = handle.is_token_in_rank.to(x.device)
        # Rank r's row of token t is its count of earlier tokens, after the rows of ranks before r.
        first = torch.tensor(_offsets(handle.send_counts or ())[:-1], dtype=torch.int64, device=x.device)
        element_row = (torch.cumsum(in_rank, dim=0) - in_rank.long() + first)[in_rank]
        bag_end = in_rank.sum(dim=1, dtype=torch.int64).cumsum(dim=0)
        acc_dtype = _accumulation_dtype(x.dtype)
        biases = [b.to(acc_dtype).contiguous() for b in request.bias if b is not None]
        combined = host_memory.empty(handle.num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
        combined_w = None
        if back_w is not None:
            combined_w = torch.empty(handle.num_tokens, back_w.shape[1], dtype=torch.float32, device=x.device)

        def finish() -> None:
            wait_all(ctx, works, step)
            cpu_kernels.bag_sum(back_x[:num_sent], element_row, bag_end, biases, combined)
            if combined_w is not None and back_w is not None:
                combined_w.copy_(_sum_weights(back_w, pieces, handle.num_tokens))
            self._scratch.give(back_x)

        return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish)

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
        return self._reduce_at_source(ctx, works, request, back_x, back_w, pieces, "payload all_to_all (worst-case blocks)", spare_row=True)

    @staticmethod
    def _segments(counts: Sequence[int]) -> list[tuple[int, int]]:
        bounds = _offsets(counts)
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def _reduce_at_source(
        self,
        ctx: StepContext,
        works: list[dist.Work | None],
        request: CombineRequest,
        back_x: torch.Tensor,
        back_w: torch.Tensor | None,
        pieces: list[tuple[torch.Tensor, int, int]],
        step: str,
        spare_row: bool = False,
    ) -> CombineOutput:
        """Sum returned rows per token, rank by rank (unique targets per call: deterministic on GPU too)."""
        handle, x = request.handle, request.x
        num_tokens = handle.num_tokens
        acc_dtype = _accumulation_dtype(x.dtype)
        extra = 1 if spare_row else 0
        combined = host_memory.empty(num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
        combined_w = None
        if back_w is not None:
            combined_w = torch.empty(num_tokens, back_w.shape[1], dtype=torch.float32, device=x.device)

        def finish() -> None:
            wait_all(ctx, works, step)
            acc = self._scratch.take((num_tokens + extra, x.shape[1]), acc_dtype, x.device).zero_()
            # On the CPU the upcast goes chunk by chunk so that its float32 copy stays in cache (5x faster
            # than one pass over the whole tensor); on a GPU one kernel per rank is best.
            chunk = max(16, _CPU_CHUNK_BYTES // (4 * max(x.shape[1], 1))) if x.device.type == "cpu" else None
            for targets, start, stop in pieces:
                rows_at_once = chunk or max(stop - start, 1)
                for lo in range(start, stop, rows_at_once):
                    hi = min(lo + rows_at_once, stop)
                    acc.index_add_(0, targets[lo - start : hi - start], back_x[lo:hi].to(acc_dtype))
            result = acc[:num_tokens]
            for bias in request.bias:
                if bias is not None:
                    result = result + bias.to(acc_dtype)
            combined.copy_(result)
            if combined_w is not None and back_w is not None:
                combined_w.copy_(_sum_weights(back_w, pieces, num_tokens + extra)[:num_tokens])
            self._scratch.give(acc, back_x)

        return CombineOutput(combined_x=combined, combined_topk_weights=combined_w, finish=finish)

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
        ctx = self._ctx("low_latency_dispatch")
        device = x.device
        world, rank = self._world, self.context.rank
        max_tokens = num_max_dispatch_tokens_per_rank
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        experts_per_rank = num_experts // world
        slots = world * max_tokens

        if use_fp8:
            payload, scales = per_token_cast_to_fp8(x)
        else:
            payload, scales = x, None
        pad = max_tokens - num_tokens
        send_x = torch.nn.functional.pad(payload.view(torch.uint8), (0, 0, 0, pad)) if pad else payload.view(torch.uint8)
        send_idx = torch.nn.functional.pad(topk_idx, (0, 0, 0, pad), value=-1) if pad else topk_idx
        gathered_x = host_memory.empty(slots, send_x.shape[1], dtype=torch.uint8, device=device)
        gathered_idx = torch.empty(slots, num_topk, dtype=torch.int64, device=device)
        works = [all_gather_rows(ctx, gathered_x, send_x.contiguous()), all_gather_rows(ctx, gathered_idx, send_idx.contiguous())]
        gathered_scales = None
        if scales is not None:
            send_scales = torch.nn.functional.pad(scales, (0, 0, 0, pad)) if pad else scales
            gathered_scales = torch.empty(slots, scales.shape[1], dtype=torch.float32, device=device)
            works.append(all_gather_rows(ctx, gathered_scales, send_scales.contiguous()))

        out_dtype = FP8_DTYPE if use_fp8 else x.dtype
        recv_x = host_memory.empty(experts_per_rank, slots, hidden, dtype=out_dtype, device=device)
        recv_scales = (
            torch.empty(experts_per_rank, slots, scales.shape[1], dtype=torch.float32, device=device)
            if scales is not None
            else None
        )
        recv_count = torch.empty(experts_per_rank, dtype=torch.int32, device=device)
        src_token_idx = torch.empty(experts_per_rank, slots, dtype=torch.int32, device=device)
        src_rank = torch.empty(experts_per_rank, slots, dtype=torch.int32, device=device)
        layout_range = torch.empty(experts_per_rank, world, 2, dtype=torch.int32, device=device)
        # Filled by the receive: for each gathered row and top-k slot, where its expert's row landed.
        state = {
            "gathered_idx": gathered_idx,
            "slot_of": torch.empty(slots, num_topk, dtype=torch.int64, device=device),
        }
        handle = LowLatencyHandle(
            buffer_id=self.context.buffer_id,
            backend=self.name,
            num_ranks=world,
            num_experts=num_experts,
            num_max_dispatch_tokens_per_rank=max_tokens,
            num_tokens=num_tokens,
            hidden=hidden,
            num_topk=num_topk,
            src_token_idx=src_token_idx,
            src_rank=src_rank,
            layout_range=layout_range,
            backend_state=state,
        )

        def receive() -> None:
            wait_all(ctx, works, "low-latency token all_gather")
            local = local_expert_ids(gathered_idx, rank, experts_per_rank)  # [R*M, K]
            hit = torch.zeros(slots, experts_per_rank + 1, dtype=torch.bool, device=device)
            hit.scatter_(1, local + 1, True)
            mask = hit[:, 1:].t().contiguous()  # [E_local, R*M]
            counts = mask.sum(dim=1)
            recv_count.copy_(counts)
            position = torch.cumsum(mask, dim=1) - 1  # slot of each gathered row within its expert
            perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [E_local, R*M]
            filled = torch.arange(slots, device=device).unsqueeze(0) < counts.unsqueeze(1)
            recv_x.view(experts_per_rank, slots, -1).view(torch.uint8).copy_(
                gathered_x.index_select(0, perm.flatten()).view(experts_per_rank, slots, -1)
            )
            if recv_scales is not None and gathered_scales is not None:
                recv_scales.copy_(gathered_scales.index_select(0, perm.flatten()).view(experts_per_rank, slots, -1))
            src_token_idx.copy_(torch.where(filled, perm % max_tokens, -1))
            src_rank.copy_(torch.where(filled, torch.div(perm, max_tokens, rounding_mode="floor"), -1))
            per_rank = mask.view(experts_per_rank, world, max_tokens).sum(dim=2)
            layout_range[:, :, 1].copy_(per_rank)
            layout_range[:, :, 0].copy_(torch.cumsum(per_rank, dim=1) - per_rank)
            # Flat index into recv_x [E_local * R * M] of (gathered row, top-k slot); -1 when not local.
            expert_for = local.clamp_min(0)
            flat = expert_for * slots + position.t().gather(1, expert_for)
            state["slot_of"].copy_(torch.where(local >= 0, flat, -1))

        hook = None
        if return_recv_hook:
            hook = receive
        else:
            receive()
        return LowLatencyDispatchOutput(
            recv_x=recv_x, recv_x_scales=recv_scales, recv_count=recv_count, handle=handle, hook=hook
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
        ctx = self._ctx("low_latency_combine")
        device = x.device
        world = self._world
        max_tokens = handle.num_max_dispatch_tokens_per_rank
        num_tokens, hidden = handle.num_tokens, handle.hidden
        slots = world * max_tokens
        state = handle.backend_state
        pad = max_tokens - num_tokens
        send_w = torch.nn.functional.pad(topk_weights.float(), (0, 0, 0, pad)) if pad else topk_weights.float()
        gathered_w = torch.empty(slots, topk_weights.shape[1], dtype=torch.float32, device=device)
        wait_all(ctx, [all_gather_rows(ctx, gathered_w, send_w.contiguous())], "low-latency weight all_gather")

        # Weighted partial sum of this rank's experts for every (source rank, token), in top-k order.
        slot_of = state["slot_of"]  # [R*M, K]
        rows = x.reshape(-1, hidden)
        partial = host_memory.zeros(slots, hidden, dtype=torch.float32, device=device)
        for k in range(slot_of.shape[1]):
            hit = slot_of[:, k] >= 0
            picked = rows.index_select(0, slot_of[:, k].clamp_min(0)).float()
            weight = torch.where(hit, gathered_w[:, k], torch.zeros_like(gathered_w[:, k]))
            partial.addcmul_(picked, weight.unsqueeze(1))
        returned = host_memory.empty(slots, hidden, dtype=torch.float32, device=device)
        works = [all_to_all_rows(ctx, returned, partial, None, None)]
        combined = out if out is not None else host_memory.empty(num_tokens, hidden, dtype=x.dtype, device=device)

        def receive() -> None:
            wait_all(ctx, works, "low-latency partial-sum all_to_all")
            total = returned.view(world, max_tokens, hidden)[:, :num_tokens].sum(dim=0)
            combined.copy_(total)

        if return_recv_hook:
            return combined, receive
        receive()
        return combined, None
