"""The symmetric device buffers of the CUDA backend: allocation, CUDA IPC sharing, protocol counters, errors.

Every rank owns one buffer of the same size (layout in csrc/include/layout.cuh and docs/kernels.md)::

    [header 4 KiB][dispatch region of source 0 .. R-1][combine region of source 0 .. R-1]

and a device table of R base pointers: its own buffer at ``[rank]`` and the others' buffers, opened through
CUDA IPC (``SymmetricBuffer.allocate_ipc``, one process per rank) or, when all ranks live in one process (the
single-GPU emulator), the plain pointers (``SymmetricBuffer.allocate_local``). The kernels compare header
flags against per-call *epochs* that only grow, so nothing is ever reset between calls. The epochs and the
finished-block counters live in the header, on the device (each launch reads its epoch there and its last
block advances it), so every launch of a buffer takes the same arguments: a CUDA graph captured on it replays
correctly, as long as every rank replays the same sequence of calls.

Errors: each buffer has a host-mapped :data:`TimeoutRecord` the kernels fill when a bounded wait expires or a
capacity check fails; :meth:`SymmetricBuffer.raise_if_failed` turns it into a :class:`CommTimeoutError` naming
the rank, the peer, the phase and the counters (a :class:`BufferCapacityError` for an overflow).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any

import torch
import torch.distributed as dist

from moe_comm.collectives import StepContext, all_gather_rows, wait_all
from moe_comm.errors import BufferCapacityError, CommTimeoutError

__all__ = ["SymmetricBuffer", "REGION_ALIGN"]

REGION_ALIGN = 1 << 20  # regions grow in whole MiB
_live: weakref.WeakSet[SymmetricBuffer] = weakref.WeakSet()


def _ext() -> Any:
    from moe_comm.backends.cuda import extension

    ext = extension()
    if ext is None:
        raise RuntimeError("cuda backend: moe_comm._C is not built")
    return ext


def round_region(nbytes: int) -> int:
    """Region size for ``nbytes`` of records: at least 1 MiB, a whole number of MiB."""
    return max(REGION_ALIGN, (nbytes + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN)


def _exchange_handles(ctx: StepContext, handle: bytes, host_device: torch.device) -> list[bytes]:
    """Every rank's IPC handle bytes, by rank."""
    world = dist.get_world_size(ctx.group)
    mine = torch.frombuffer(bytearray(handle), dtype=torch.uint8).reshape(1, -1).to(host_device)
    table = torch.empty(world, mine.shape[1], dtype=torch.uint8, device=host_device)
    wait_all(ctx, [all_gather_rows(ctx, table, mine)], "CUDA IPC handle exchange")
    return [bytes(row) for row in table.cpu().tolist()]


class SymmetricBuffer:
    """One rank's symmetric buffer, its view of the peers' buffers, and the protocol state.

    Attributes:
        rank, num_ranks: this rank and R.
        device: the CUDA device holding the buffer.
        dispatch_region_bytes, combine_region_bytes: bytes of one source's region of each kind.
        base: device address of this rank's buffer.
        peer_table: ``[R]`` int64 CUDA tensor of base addresses (the kernels' ``peers``).
    """

    def __init__(
        self,
        *,
        rank: int,
        num_ranks: int,
        device: torch.device,
        dispatch_region_bytes: int,
        combine_region_bytes: int,
        base: int,
        peers: list[int],
        opened: list[int],
        timeout_s: float,
    ) -> None:
        self.rank = rank
        self.num_ranks = num_ranks
        self.device = device
        self.dispatch_region_bytes = dispatch_region_bytes
        self.combine_region_bytes = combine_region_bytes
        self.base = base
        self.peers = peers
        self._opened = opened  # IPC mappings to close on destroy
        self.peer_table = torch.tensor(peers, dtype=torch.int64, device=device)
        # flag, rank, peer, phase (int32) then expected, observed (int64): ptx.cuh TimeoutRecord.
        self.error_record = torch.zeros(8, dtype=torch.int32).pin_memory()
        self.timeout_s = timeout_s
        self.timeout_ns = max(1, int(timeout_s * 1e9))  # the kernels measure it on the GPU's global timer
        self.destroyed = False
        _live.add(self)

    # ------------------------------------------------------------------------------------------------
    # construction

    @staticmethod
    def total_bytes(num_ranks: int, dispatch_region_bytes: int, combine_region_bytes: int) -> int:
        return int(_ext().symmetric_buffer_bytes(num_ranks, dispatch_region_bytes, combine_region_bytes))

    @classmethod
    def allocate_ipc(
        cls,
        ctx: StepContext,
        host_device: torch.device,
        device: torch.device,
        dispatch_region_bytes: int,
        combine_region_bytes: int,
        timeout_s: float,
    ) -> SymmetricBuffer:
        """Collective over ``ctx.group`` (one process per rank): allocate, exchange IPC handles (a bounded
        all-gather on ``host_device``, the group's device), open the peers' handles."""
        ext = _ext()
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = cls.total_bytes(world, dispatch_region_bytes, combine_region_bytes)
        base = ext.device_alloc_zeroed(index, nbytes)
        handles = _exchange_handles(ctx, ext.ipc_get_handle(index, base), host_device)
        peers, opened = [], []
        try:
            for r, handle in enumerate(handles):
                if r == rank:
                    peers.append(base)
                    continue
                ptr = ext.ipc_open_handle(index, handle)
                opened.append(ptr)
                peers.append(ptr)
        except RuntimeError:
            for ptr in opened:
                ext.ipc_close_handle(index, ptr)
            ext.device_free(index, base)
            raise
        return cls(rank=rank, num_ranks=world, device=torch.device("cuda", index),
                   dispatch_region_bytes=dispatch_region_bytes, combine_region_bytes=combine_region_bytes,
                   base=base, peers=peers, opened=opened, timeout_s=timeout_s)

    @classmethod
    def allocate_local(
        cls,
        num_ranks: int,
        device: torch.device,
        dispatch_region_bytes: int,
        combine_region_bytes: int,
        timeout_s: float,
    ) -> list[SymmetricBuffer]:
        """All ``num_ranks`` buffers in this process (single-GPU emulation): peers are plain pointers."""
        ext = _ext()
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = cls.total_bytes(num_ranks, dispatch_region_bytes, combine_region_bytes)
        bases = [ext.device_alloc_zeroed(index, nbytes) for _ in range(num_ranks)]
        return [
            cls(rank=r, num_ranks=num_ranks, device=torch.device("cuda", index),
                dispatch_region_bytes=dispatch_region_bytes, combine_region_bytes=combine_region_bytes,
                base=bases[r], peers=list(bases), opened=[], timeout_s=timeout_s)
            for r in range(num_ranks)
        ]

    # ------------------------------------------------------------------------------------------------
    # protocol state

    def view(self, kernel: str) -> tuple:
        """The kernels' ``PeerView`` tuple for a launch of ``kernel`` (the same for every launch on this buffer:
        no per-call state). Refused once a kernel recorded an error: the buffer's flags and counters may then
        be inconsistent, and launching on them could publish incomplete rows."""
        if self.destroyed:
            raise RuntimeError(f"rank {self.rank}: the CUDA symmetric buffer was destroyed")
        self.raise_if_failed(kernel)
        return (self.peer_table.data_ptr(), self.rank, self.num_ranks, self.dispatch_region_bytes,
                self.combine_region_bytes, self.timeout_ns, self.error_record.data_ptr())

    def capacity_rows(self, record_bytes: int, family: str) -> int:
        region = self.dispatch_region_bytes if family == "dispatch" else self.combine_region_bytes
        return region // record_bytes

    def raise_if_failed(self, op: str) -> None:
        """Raise :class:`CommTimeoutError` if a kernel recorded an expired wait, :class:`BufferCapacityError` if it
        recorded an overflow (no device sync)."""
        record = self.error_record
        if int(record[0]) != 1:
            return
        flag, rank, peer, phase = record[:4].tolist()
        expected, observed = record[4:].view(torch.int64).tolist()
        names = {v: k for k, v in _ext().PHASES.items()}
        phase_name = names.get(phase, f"phase {phase}")
        if phase_name == "overflow":
            raise BufferCapacityError(rank, op, peer, observed, expected)
        if phase_name == "peer_aborted":
            what = f"rank {peer}: its wait on the CUDA buffers expired first, so this rank's gave up at once"
        else:
            what = f"{phase_name.replace('_', ' ')} flag of peer rank {peer}"
        step = f"{what} (expected >= {expected}, observed {observed})"
        raise CommTimeoutError(rank, op, step, self.timeout_s,
                               "the CUDA symmetric buffer is now inconsistent: destroy the Buffer")

    # ------------------------------------------------------------------------------------------------
    # teardown

    def destroy(self) -> None:
        """Unmap the peers' buffers and free this one. The caller makes sure no kernel still uses them
        (every rank synchronises its device and meets the others at a barrier first). Idempotent."""
        if self.destroyed:
            return
        self.destroyed = True
        ext = _ext()
        index = self.device.index or 0
        for ptr in self._opened:
            ext.ipc_close_handle(index, ptr)
        ext.device_free(index, self.base)
        self._opened = []


@atexit.register
def _free_at_exit() -> None:
    """Release what is left at interpreter exit (no barrier: peers are exiting too)."""
    for buf in list(_live):
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize(buf.device)
            buf.destroy()
        except Exception:  # noqa: BLE001 - best effort while the process exits
            pass
