"""A Python MODEL of the kernels in csrc/kernels/*.cu and of the device memory they run on.

This module does not run, compile or test any CUDA code. Each launcher of :class:`KernelModel` has the
signature of the binding of the same name in csrc/bindings/python_api.cpp and does two things:

1. it calls the REAL binding of the built extension with the same arguments, so the pybind signature and
   every host-side ``MC_CHECK`` of the launcher run on the arguments the host code passes (a rejected
   argument raises exactly as it would on a GPU). Without a CUDA device the launch itself then fails with
   a CUDA runtime error, which is expected and swallowed;
2. it runs a sequential transcription of the kernel, synchronously, on the raw addresses: the same record
   layout, positions, header slots, epochs, bounded waits, error records and finished-block counter as the
   ``.cu`` source. Blocks and warps become loops; a warp's lanes become one tensor operation per row.

Where the real kernel would fault (a misaligned vector access, a write outside the symmetric buffers) or
where host and device bookkeeping disagree (the finished-block counter), the model raises AssertionError.

"Device memory" (:class:`DeviceMemory`) is one file per allocation in a directory (normally under /dev/shm),
mapped into every rank process that opens it; an "IPC handle" is the file's name. Ranks are separate
processes, so the handle exchange, the opening of the peers' buffers and the spin waits on flags written
by other processes all really happen.

What the model cannot show: memory ordering and visibility (its writes are sequentially consistent),
concurrency between blocks, performance, or the kernels' arithmetic as compiled (rounding of the FP8 cast
and the reduction are transcribed, not executed on a GPU). scripts/gpu_check.sh covers those on a GPU.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from moe_comm.fp8 import per_token_cast_to_fp8

__all__ = ["LAUNCHERS", "DeviceMemory", "KernelModel", "PeerView", "RecordLayout", "model_extension", "raw"]

# csrc/include/intranode.cuh DType: the combine reduction's row dtype, and the fused FP8 cast's source dtype, by code.
COMBINE_DTYPES = {0: torch.bfloat16, 1: torch.float16, 2: torch.float32, 3: torch.float64}
FP8_BLOCK = 128  # csrc/include/ptx.cuh kFp8Block: channels per scale
FP8_MAX = 448.0
IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
POLL_S = 1e-4  # sleep between polls of a spin wait (the ranks share a few CPU cores)

# What MC_CUDA_CHECK raises when a CUDA runtime call fails ("cudaGetLastError() failed: ..."): the only error
# the real binding may raise here, since this machine has no CUDA device to launch on.
_CUDA_RUNTIME_FAILURE = re.compile(r"\bcuda[A-Za-z]+\(.*\) failed: ")


def epoch_after(epoch: int) -> int:
    """ptx.cuh epoch_after: ``epoch + 1`` in int32, wrapping from 2^31 - 1 to -2^31."""
    return (epoch + 1 + 2**31) % 2**32 - 2**31


def epoch_before(epoch: int) -> int:
    """ptx.cuh epoch_before: ``epoch - 1`` in int32, wrapping from -2^31 to 2^31 - 1."""
    return (epoch - 1 + 2**31) % 2**32 - 2**31


def epoch_reached(value: int, want: int) -> bool:
    """ptx.cuh epoch_reached: ``value - want`` modulo 2^32 lies in ``[0, 2^31)`` (serial-number order)."""
    return (value - want) % 2**32 < 2**31


def raw(addr: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` elements of ``dtype`` at host address ``addr``, as a tensor sharing that memory."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    assert addr != 0, "the kernel would dereference a null pointer"
    return torch.frombuffer((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(addr), dtype=dtype)


def warp_copy16(dst: int, src: int, nbytes: int) -> None:
    """ptx.cuh warp_copy16: int4 loads and stores, so both pointers and the size must be 16-byte multiples."""
    assert dst % 16 == 0 and src % 16 == 0 and nbytes % 16 == 0, (
        f"misaligned 16-byte vector copy: dst {dst:#x}, src {src:#x}, {nbytes} bytes"
    )
    ctypes.memmove(dst, src, nbytes)


def call_binding(binding: Callable[..., Any], *args: Any) -> None:
    """Run the real binding: its argument conversion and MC_CHECKs raise as on a GPU; the CUDA runtime call
    that follows them fails here for lack of a device, and that failure is the expected outcome."""
    try:
        binding(*args)
    except RuntimeError as exc:
        if not _CUDA_RUNTIME_FAILURE.search(str(exc)):
            raise


# ----------------------------------------------------------------------------------------------------
# device memory and IPC


# Bytes mapped after every allocation: under AddressSanitizer (scripts/simt_asan.sh) they are poisoned, so a kernel
# that reads or writes past the end of a buffer stops with ASan's report.
GUARD_BYTES = 4096


def _asan_function(name: str) -> Callable[[int, int], None] | None:
    """``__asan_(un)poison_memory_region`` when AddressSanitizer is loaded in this process, else None."""
    function = getattr(ctypes.CDLL(None), name, None)
    if function is not None:
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        function.restype = None
    return function


class DeviceMemory:
    """One process's "device memory": files in ``directory`` mapped shared; an IPC handle is the file name and
    the allocation's size. Every file has :data:`GUARD_BYTES` more than the allocation, poisoned under ASan."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._maps: dict[int, tuple[mmap.mmap, str, bool, int]] = {}  # address -> (mapping, file, owned, bytes)
        self._allocations = 0
        self._poison = _asan_function("__asan_poison_memory_region")
        self._unpoison = _asan_function("__asan_unpoison_memory_region")

    def _map(self, name: str, nbytes: int, owned: bool) -> int:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if owned else 0), 0o600)
        try:
            if owned:
                os.ftruncate(fd, nbytes + GUARD_BYTES)  # a new file reads as zeros, like cudaMemset(0)
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        probe = ctypes.c_uint8.from_buffer(mapping)
        addr = ctypes.addressof(probe)
        del probe  # release the export so the mapping can be closed later
        self._maps[addr] = (mapping, name, owned, nbytes)
        if self._poison is not None:
            guard = (nbytes + 7) // 8 * 8  # ASan poisons whole 8-byte granules
            self._poison(addr + guard, len(mapping) - guard)
        return addr

    def _unmap(self, ptr: int) -> tuple[str, bool]:
        mapping, name, owned, _ = self._maps.pop(ptr)
        if self._unpoison is not None:
            self._unpoison(ptr, len(mapping))  # the next mapping at this address starts clean
        mapping.close()
        return name, owned

    def alloc_zeroed(self, nbytes: int) -> int:
        self._allocations += 1
        return self._map(f"{os.getpid()}_{self._allocations}", nbytes, owned=True)

    def free(self, ptr: int) -> None:
        name, owned = self._unmap(ptr)
        assert owned, "device_free of a pointer opened through IPC"
        os.unlink(os.path.join(self.directory, name))

    def ipc_handle(self, ptr: int) -> bytes:
        _, name, owned, nbytes = self._maps[ptr]
        assert owned, "ipc_get_handle of a pointer opened through IPC"
        return f"{name}:{nbytes}".encode().ljust(IPC_HANDLE_BYTES, b"\0")

    def ipc_open(self, handle: bytes) -> int:
        name, nbytes = handle.rstrip(b"\0").decode().split(":")
        return self._map(name, int(nbytes), owned=False)

    def ipc_close(self, ptr: int) -> None:
        _, owned = self._unmap(ptr)
        assert not owned, "ipc_close_handle of a pointer this process allocated"

    def check_range(self, addr: int, nbytes: int) -> None:
        """Assert that ``[addr, addr + nbytes)`` lies inside one mapped symmetric buffer."""
        for start, (_, _, _, size) in self._maps.items():
            if start <= addr and addr + nbytes <= start + size:
                return
        raise AssertionError(f"the kernel would access {nbytes} bytes at {addr:#x}, outside every symmetric buffer")


# ----------------------------------------------------------------------------------------------------
# kernel arguments


@dataclass(frozen=True)
class PeerView:
    """csrc/include/intranode.cuh PeerView as a kernel of the protocol runs with it: the host's 7-tuple, read as
    python_api.cpp peer_view() reads it (``(peers, rank, num_ranks, dispatch_region_bytes, combine_region_bytes,
    timeout_ns, err)``), plus the launch's epoch, which launch_view() reads from the header."""

    peers: list[int]
    rank: int
    num_ranks: int
    dispatch_region_bytes: int
    combine_region_bytes: int
    timeout_ns: int
    err: int
    header_bytes: int
    epoch: int = 0

    @classmethod
    def parse(cls, view: tuple, header_bytes: int) -> PeerView:
        assert len(view) == 7, f"the host passed a {len(view)}-tuple view"
        num_ranks = int(view[2])
        return cls(
            peers=raw(int(view[0]), num_ranks, torch.int64).tolist(),
            rank=int(view[1]),
            num_ranks=num_ranks,
            dispatch_region_bytes=int(view[3]),
            combine_region_bytes=int(view[4]),
            timeout_ns=int(view[5]),
            err=int(view[6]),
            header_bytes=header_bytes,
        )

    def header(self, rank: int) -> torch.Tensor:
        """header_of(v, rank): the int32 slots of ``rank``'s buffer."""
        return raw(self.peers[rank], self.header_bytes // 4, torch.int32)

    def dispatch_region(self, owner: int, source: int) -> int:
        """Address of ``source``'s dispatch region in ``owner``'s buffer (layout.cuh dispatch_region_offset)."""
        return self.peers[owner] + self.header_bytes + source * self.dispatch_region_bytes

    def combine_region(self, owner: int, source: int) -> int:
        """Address of ``source``'s combine region in ``owner``'s buffer (layout.cuh combine_region_offset)."""
        return (self.peers[owner] + self.header_bytes + self.num_ranks * self.dispatch_region_bytes
                + source * self.combine_region_bytes)


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class RecordLayout:
    """layout.cuh RecordLayout: row | scales (f32) | local top-k ids (i32) | weights (f32) | src index (i32)."""

    scales: int
    topk_idx: int
    topk_weights: int
    src_idx: int
    bytes: int

    @classmethod
    def of(cls, row_bytes: int, num_scales: int, num_topk: int) -> RecordLayout:
        scales = _align_up(row_bytes, 16)
        topk_idx = scales + _align_up(num_scales * 4, 16)
        topk_weights = topk_idx + _align_up(num_topk * 4, 16)
        src_idx = topk_weights + _align_up(num_topk * 4, 16)
        return cls(scales, topk_idx, topk_weights, src_idx, src_idx + 16)


# ----------------------------------------------------------------------------------------------------
# the kernels


class KernelModel:
    """The launchers of ``moe_comm._C``, modelled (see the module docstring).

    Args:
        real: the built extension (its constants, layout arithmetic and bindings for argument checks).
        memory: this process's device memory.
        on_launch: called with ``(kernel name, stream handle)`` at every kernel launch.
    """

    def __init__(self, real: ModuleType, memory: DeviceMemory, on_launch: Callable[[str, int], None]) -> None:
        self.real = real
        self.memory = memory
        self.on_launch = on_launch
        self.slot = dict(real.HEADER_SLOTS)
        self.kernel_id = dict(real.KERNEL_IDS)
        self.phase = dict(real.PHASES)

    def _view(self, view: tuple, kernel: str) -> PeerView:
        """launch_view: the host's view at one past the last epoch ``kernel`` completed on this rank."""
        v = PeerView.parse(view, int(self.real.HEADER_BYTES))
        return dataclasses.replace(v, epoch=epoch_after(int(v.header(v.rank)[self.slot["epochs"] + self.kernel_id[kernel]])))

    def _record(self, row_bytes: int, num_scales: int, num_topk: int) -> RecordLayout:
        rec = RecordLayout.of(row_bytes, num_scales, num_topk)
        assert rec.bytes == self.real.token_record_bytes(row_bytes, num_scales, num_topk)
        return rec

    # -- ptx.cuh ---------------------------------------------------------------------------------------

    def _record_error(self, v: PeerView, peer: int, phase: int, expected: int, observed: int) -> None:
        """record_error: the first writer claims the record (0 -> -1), fills it, then publishes flag 1."""
        flags = raw(v.err, 4, torch.int32)  # flag, rank, peer, phase
        if int(flags[0]) != 0:
            return
        flags[0] = -1
        flags[1], flags[2], flags[3] = v.rank, peer, phase
        raw(v.err + 16, 2, torch.int64)[:] = torch.tensor([expected, observed])
        flags[0] = 1

    def _wait_all_ranks(self, v: PeerView, slot: int, expected: int, phase: int) -> bool:
        """block_wait_all_ranks: threads 0..R-1 each spin until header[slot + thread] reaches epoch ``expected``
        (:func:`epoch_reached`), all starting together, each bounded by timeout_ns (wait_flag_or_abort). An
        expired wait records its peer and sets every rank's abort word; a wait that finds this rank's abort word
        set records the rank that set it and gives up. True if every wait succeeded."""
        own = v.header(v.rank)
        abort = self.slot["abort"]
        start = time.monotonic_ns()
        pending = list(range(v.num_ranks))
        while True:
            pending = [r for r in pending if not epoch_reached(int(own[slot + r]), expected)]
            if not pending:
                return True
            aborted_by = int(own[abort])
            if aborted_by:
                self._record_error(v, aborted_by - 1, self.phase["peer_aborted"], expected, int(own[slot + pending[0]]))
                return False
            if time.monotonic_ns() - start > v.timeout_ns:
                for r in pending:
                    self._record_error(v, r, phase, expected, int(own[slot + r]))
                for r in range(v.num_ranks):
                    v.header(r)[abort] = v.rank + 1  # st_release_sys
                return False
            time.sleep(POLL_S)

    def _last_block_to_finish(self, v: PeerView, kernel: str) -> bool:
        """last_block_to_finish (and last_block_of_complete_launch): the model runs a launch's blocks together,
        so they all succeed (a failed wait returns before this) and the last one is reached; the blocks' adds and
        the last block's reset leave the counter at 0, where every launch must find it."""
        counter = int(v.header(v.rank)[self.slot["blocks_done"] + self.kernel_id[kernel]])
        assert counter == 0, (
            f"rank {v.rank} {kernel}: the finished-block counter is {counter} at a launch; a previous "
            "launch did not finish, so no block of this one would be the last"
        )
        return True

    def _complete_epoch(self, v: PeerView, kernel: str) -> None:
        """complete_epoch: in the last block, this rank's ``kernel`` completed the view's epoch."""
        v.header(v.rank)[self.slot["epochs"] + self.kernel_id[kernel]] = v.epoch

    # -- csrc/kernels/intranode_dispatch.cu ------------------------------------------------------------

    def _token_slots(self, v: PeerView, is_token_in_rank: int, send_pos: int, num_tokens: int,
                     capacity_rows: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """Per token t: ``(t, [(rank d, slot of t in d's region), ...])`` for the ranks t goes to, in rank order.
        A slot outside ``[0, capacity_rows)`` is recorded as an overflow and left out, as the kernels do."""
        ranks = v.num_ranks
        in_rank = raw(is_token_in_rank, num_tokens * ranks, torch.bool)
        positions = raw(send_pos, num_tokens * ranks, torch.int32)
        for t in range(num_tokens):
            slots = []
            for d in range(ranks):
                if not bool(in_rank[t * ranks + d]):
                    continue
                pos = int(positions[t * ranks + d])
                if pos < 0 or pos >= capacity_rows:
                    self._record_error(v, d, self.phase["overflow"], capacity_rows, pos)
                    continue
                slots.append((d, pos))
            yield t, slots

    def dispatch_send(self, view: tuple, x: int, x_scales: int, topk_idx: int, topk_weights: int,
                      is_token_in_rank: int, send_pos: int, num_tokens_per_rank: int, num_tokens: int, row_bytes: int,
                      num_scales: int, num_topk: int, experts_per_rank: int, capacity_rows: int, cast_dtype: int,
                      num_sms: int, stream: int) -> None:
        call_binding(self.real.dispatch_send, view, x, x_scales, topk_idx, topk_weights, is_token_in_rank, send_pos,
                     num_tokens_per_rank, num_tokens, row_bytes, num_scales, num_topk, experts_per_rank,
                     capacity_rows, cast_dtype, num_sms, stream)
        self.on_launch("dispatch_send", stream)
        v = self._view(view, "dispatch_send")
        if not self._wait_all_ranks(v, self.slot["dispatch_free"], epoch_before(v.epoch), self.phase["dispatch_free"]):
            return
        rec = self._record(row_bytes, num_scales, num_topk)
        ranks = v.num_ranks
        cast = cast_dtype != self.real.NO_CAST
        for t, slots in self._token_slots(v, is_token_in_rank, send_pos, num_tokens, capacity_rows):
            if cast:  # the fused cast: x holds [T, H] of the cast dtype, H = row_bytes FP8 bytes
                source = COMBINE_DTYPES[cast_dtype]
                assert (x + t * row_bytes * source.itemsize) % 16 == 0, "misaligned 16-byte load of a row to cast"
                fp8_row, row_scales = per_token_cast_to_fp8(raw(x + t * row_bytes * source.itemsize, row_bytes, source).unsqueeze(0))
            for d, pos in slots:
                dst = v.dispatch_region(d, v.rank) + pos * rec.bytes
                self.memory.check_range(dst, rec.bytes)
                if cast:
                    raw(dst, row_bytes, torch.uint8)[:] = fp8_row.view(torch.uint8)[0]
                    raw(dst + rec.scales, num_scales, torch.float32)[:] = row_scales[0]
                else:
                    warp_copy16(dst, x + t * row_bytes, row_bytes)
                if x_scales:
                    raw(dst + rec.scales, num_scales, torch.float32)[:] = raw(x_scales + t * num_scales * 4, num_scales, torch.float32)
                if topk_idx and num_topk:
                    e = raw(topk_idx + t * num_topk * 8, num_topk, torch.int64)
                    first = d * experts_per_rank
                    local = (e >= first) & (e < first + experts_per_rank)
                    raw(dst + rec.topk_idx, num_topk, torch.int32)[:] = torch.where(local, e - first, -1)
                    if topk_weights:
                        w = raw(topk_weights + t * num_topk * 4, num_topk, torch.float32)
                        raw(dst + rec.topk_weights, num_topk, torch.float32)[:] = torch.where(local, w, 0.0)
                raw(dst + rec.src_idx, 1, torch.int32)[0] = t
        if self._last_block_to_finish(v, "dispatch_send"):
            counts = raw(num_tokens_per_rank, ranks, torch.int32)
            for d in range(ranks):
                peer = v.header(d)
                peer[self.slot["dispatch_count"] + v.rank] = counts[d]
                peer[self.slot["dispatch_flag"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "dispatch_send")

    def dispatch_recv(self, view: tuple, recv_x: int, recv_scales: int, recv_topk_idx: int, recv_topk_weights: int,
                      recv_src_idx: int, recv_src_rank: int, recv_counts: int, recv_expert_counts: int,
                      num_local_experts: int, max_rows: int, row_bytes: int, num_scales: int, num_topk: int,
                      capacity_rows: int, pad_rows: bool, num_sms: int, stream: int) -> None:
        call_binding(self.real.dispatch_recv, view, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx,
                     recv_src_rank, recv_counts, recv_expert_counts, num_local_experts, max_rows, row_bytes, num_scales,
                     num_topk, capacity_rows, pad_rows, num_sms, stream)
        self.on_launch("dispatch_recv", stream)
        v = self._view(view, "dispatch_recv")
        if not self._wait_all_ranks(v, self.slot["dispatch_flag"], v.epoch, self.phase["dispatch_arrive"]):
            return
        own = v.header(v.rank)
        start, total, wanted = [], 0, 0
        for s in range(v.num_ranks):
            start.append(total)
            count = int(own[self.slot["dispatch_count"] + s])  # written before the flag acquired above
            if count > capacity_rows:
                self._record_error(v, s, self.phase["overflow"], capacity_rows, count)
                count = capacity_rows
            wanted += count
            count = min(count, max_rows - total)  # clipped to the outputs, so the combine reads within them
            raw(recv_counts, v.num_ranks, torch.int32)[s] = count  # block 0
            total += count
        if wanted > max_rows:
            self._record_error(v, -1, self.phase["overflow"], max_rows, wanted)
        start.append(total)

        rec = self._record(row_bytes, num_scales, num_topk)
        for i in range(start[v.num_ranks]):
            s = 0  # source_of_row
            while s + 1 < v.num_ranks and i >= start[s + 1]:
                s += 1
            j = i - start[s]
            src = v.dispatch_region(v.rank, s) + j * rec.bytes
            self.memory.check_range(src, rec.bytes)
            warp_copy16(recv_x + i * row_bytes, src, row_bytes)
            if recv_scales:
                raw(recv_scales + i * num_scales * 4, num_scales, torch.float32)[:] = raw(src + rec.scales, num_scales, torch.float32)
            if num_topk:
                ids = raw(src + rec.topk_idx, num_topk, torch.int32)
                if recv_topk_idx:
                    raw(recv_topk_idx + i * num_topk * 8, num_topk, torch.int64)[:] = ids
                if recv_expert_counts:  # an atomicAdd per local id
                    local = ids[(ids >= 0) & (ids < num_local_experts)].long()
                    raw(recv_expert_counts, num_local_experts, torch.int32).index_add_(0, local, torch.ones_like(local, dtype=torch.int32))
                if recv_topk_weights:
                    raw(recv_topk_weights + i * num_topk * 4, num_topk, torch.float32)[:] = raw(src + rec.topk_weights, num_topk, torch.float32)
            if recv_src_idx:
                raw(recv_src_idx + i * 4, 1, torch.int32)[0] = raw(src + rec.src_idx, 1, torch.int32)[0]
            if recv_src_rank:
                raw(recv_src_rank + i * 4, 1, torch.int32)[0] = s
        pad = max_rows - start[v.num_ranks] if pad_rows else 0  # write_padding_row, rows [total, max_rows)
        if pad > 0:
            first = start[v.num_ranks]
            assert recv_x % 16 == 0 and row_bytes % 16 == 0, "misaligned 16-byte vector store of a padding row"
            raw(recv_x + first * row_bytes, pad * row_bytes, torch.uint8).zero_()
            for addr, width, dtype, value in ((recv_scales, num_scales, torch.float32, 0), (recv_topk_idx, num_topk, torch.int64, -1),
                                              (recv_topk_weights, num_topk, torch.float32, 0), (recv_src_idx, 1, torch.int32, -1),
                                              (recv_src_rank, 1, torch.int32, -1)):
                if addr and width:
                    raw(addr + first * width * dtype.itemsize, pad * width, dtype).fill_(value)
        if self._last_block_to_finish(v, "dispatch_recv"):
            for s in range(v.num_ranks):
                v.header(s)[self.slot["dispatch_free"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "dispatch_recv")

    # -- csrc/kernels/intranode_combine.cu -------------------------------------------------------------

    def combine_send(self, view: tuple, x: int, topk_weights: int, recv_counts: int, row_bytes: int, num_topk: int,
                     capacity_rows: int, num_sms: int, stream: int) -> None:
        call_binding(self.real.combine_send, view, x, topk_weights, recv_counts, row_bytes, num_topk, capacity_rows,
                     num_sms, stream)
        self.on_launch("combine_send", stream)
        v = self._view(view, "combine_send")
        if not self._wait_all_ranks(v, self.slot["combine_free"], epoch_before(v.epoch), self.phase["combine_free"]):
            return
        counts = raw(recv_counts, v.num_ranks, torch.int32)
        start, total = [], 0
        for s in range(v.num_ranks):
            start.append(total)
            total += int(counts[s])
        start.append(total)

        rec_bytes = int(self.real.combine_record_bytes(row_bytes, num_topk))
        weights_offset = _align_up(row_bytes, 16)
        for i in range(total):
            s = 0  # source_of_row
            while s + 1 < v.num_ranks and i >= start[s + 1]:
                s += 1
            j = i - start[s]
            if j >= capacity_rows:
                self._record_error(v, s, self.phase["overflow"], capacity_rows, j)
                continue
            dst = v.combine_region(s, v.rank) + j * rec_bytes
            self.memory.check_range(dst, rec_bytes)
            warp_copy16(dst, x + i * row_bytes, row_bytes)
            if topk_weights and num_topk:
                raw(dst + weights_offset, num_topk, torch.float32)[:] = raw(topk_weights + i * num_topk * 4, num_topk, torch.float32)
        if self._last_block_to_finish(v, "combine_send"):
            for s in range(v.num_ranks):
                v.header(s)[self.slot["combine_flag"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "combine_send")

    def combine_recv(self, view: tuple, is_token_in_rank: int, send_pos: int, bias0: int, bias1: int, out: int,
                     out_weights: int, num_tokens: int, hidden: int, num_topk: int, capacity_rows: int, dtype: int,
                     num_sms: int, stream: int) -> None:
        call_binding(self.real.combine_recv, view, is_token_in_rank, send_pos, bias0, bias1, out, out_weights,
                     num_tokens, hidden, num_topk, capacity_rows, dtype, num_sms, stream)
        self.on_launch("combine_recv", stream)
        v = self._view(view, "combine_recv")
        if not self._wait_all_ranks(v, self.slot["combine_flag"], v.epoch, self.phase["combine_arrive"]):
            return
        row_dtype = COMBINE_DTYPES[dtype]
        acc_dtype = torch.float64 if row_dtype == torch.float64 else torch.float32  # Acc<T>
        row_bytes = hidden * row_dtype.itemsize
        rec_bytes = int(self.real.combine_record_bytes(row_bytes, num_topk))
        weights_offset = _align_up(row_bytes, 16)
        ranks = v.num_ranks
        for t, slots in self._token_slots(v, is_token_in_rank, send_pos, num_tokens, capacity_rows):
            rows = []
            for d, pos in slots:
                row = v.combine_region(v.rank, d) + pos * rec_bytes
                self.memory.check_range(row, rec_bytes)
                assert row % 16 == 0, f"misaligned int4 load of a combine record at {row:#x}"
                rows.append(row)
            # Each lane's kVec accumulators, for all lanes at once: rank order, one rounding to T at the end.
            acc = torch.zeros(hidden, dtype=acc_dtype)
            for row in rows:
                acc += raw(row, hidden, row_dtype).to(acc_dtype)
            if bias0:
                acc += raw(bias0 + t * hidden * acc_dtype.itemsize, hidden, acc_dtype)
            if bias1:
                acc += raw(bias1 + t * hidden * acc_dtype.itemsize, hidden, acc_dtype)
            out_row = out + t * row_bytes
            assert out_row % 16 == 0, f"misaligned int4 store of an output row at {out_row:#x}"
            raw(out_row, hidden, row_dtype)[:] = acc.to(row_dtype)
            if out_weights and num_topk:
                w = torch.zeros(num_topk, dtype=torch.float32)
                for row in rows:
                    w += raw(row + weights_offset, num_topk, torch.float32)
                raw(out_weights + t * num_topk * 4, num_topk, torch.float32)[:] = w
        if self._last_block_to_finish(v, "combine_recv"):
            for d in range(ranks):
                v.header(d)[self.slot["combine_free"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "combine_recv")

    # -- csrc/kernels/fp8_cast.cu, csrc/kernels/layout.cu -----------------------------------------------

    def low_latency_combine_send(self, view: tuple, x: int, slot_of: int, src_idx: int, src_rank: int, num_rows: int,
                                 num_topk: int, max_tokens: int, row_bytes: int, num_sms: int, stream: int) -> None:
        call_binding(self.real.low_latency_combine_send, view, x, slot_of, src_idx, src_rank, num_rows, num_topk,
                     max_tokens, row_bytes, num_sms, stream)
        self.on_launch("low_latency_combine_send", stream)
        v = self._view(view, "combine_send")
        if not self._wait_all_ranks(v, self.slot["combine_free"], epoch_before(v.epoch), self.phase["combine_free"]):
            return
        slots = raw(slot_of, num_rows * num_topk, torch.int64)
        src, src_r = raw(src_idx, num_rows, torch.int32), raw(src_rank, num_rows, torch.int32)
        for item in range(num_rows * num_topk):  # (received row, choice) pairs, a warp each
            row = int(slots[item]) if num_rows else -1
            if row < 0:
                continue
            n, k = divmod(item, num_topk)
            s, t = int(src_r[n]), int(src[n])
            if not (0 <= s < v.num_ranks and 0 <= t < max_tokens):
                self._record_error(v, s, self.phase["overflow"], max_tokens, t)
                continue
            dst = v.combine_region(s, v.rank) + (t * num_topk + k) * row_bytes
            self.memory.check_range(dst, row_bytes)
            warp_copy16(dst, x + row * row_bytes, row_bytes)
        if self._last_block_to_finish(v, "combine_send"):
            for s in range(v.num_ranks):
                v.header(s)[self.slot["combine_flag"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "combine_send")

    def low_latency_combine_recv(self, view: tuple, topk_idx: int, topk_weights: int, out: int, num_tokens: int,
                                 num_topk: int, hidden: int, experts_per_rank: int, max_tokens: int, dtype: int,
                                 num_sms: int, stream: int) -> None:
        call_binding(self.real.low_latency_combine_recv, view, topk_idx, topk_weights, out, num_tokens, num_topk, hidden,
                     experts_per_rank, max_tokens, dtype, num_sms, stream)
        self.on_launch("low_latency_combine_recv", stream)
        v = self._view(view, "combine_recv")
        if not self._wait_all_ranks(v, self.slot["combine_flag"], v.epoch, self.phase["combine_arrive"]):
            return
        row_dtype = COMBINE_DTYPES[dtype]
        acc_dtype = torch.float64 if row_dtype == torch.float64 else torch.float32  # Acc<T>
        row_bytes = hidden * row_dtype.itemsize
        ids = raw(topk_idx, num_tokens * num_topk, torch.int64).view(num_tokens, num_topk)
        weights = raw(topk_weights, num_tokens * num_topk, torch.float32).view(num_tokens, num_topk)
        result = raw(out, num_tokens * hidden, row_dtype).view(num_tokens, hidden)
        for t in range(num_tokens):
            acc = torch.zeros(hidden, dtype=acc_dtype)
            for k in range(num_topk):  # k order (the GPU fuses w * v + acc; compared within a tolerance)
                e = int(ids[t, k])
                if e < 0 or e >= experts_per_rank * v.num_ranks:  # as the layout kernel, ids past E are none
                    continue
                row = v.combine_region(v.rank, e // experts_per_rank) + (t * num_topk + k) * row_bytes
                self.memory.check_range(row, row_bytes)
                acc += weights[t, k].to(acc_dtype) * raw(row, hidden, row_dtype).to(acc_dtype)
            result[t] = acc.to(row_dtype)
        if self._last_block_to_finish(v, "combine_recv"):
            for d in range(v.num_ranks):
                v.header(d)[self.slot["combine_free"] + v.rank] = v.epoch  # st_release_sys
            self._complete_epoch(v, "combine_recv")

    def expert_major(self, x: int, scales: int, local_ids: int, src_idx: int, src_rank: int, out_x: int, out_scales: int,
                     recv_count: int, out_src_idx: int, out_src_rank: int, layout_range: int, slot_of: int, row_of: int,
                     num_rows: int, row_bytes: int, num_scales: int, num_topk: int, num_experts: int, num_ranks: int,
                     num_sms: int, stream: int) -> None:
        call_binding(self.real.expert_major, x, scales, local_ids, src_idx, src_rank, out_x, out_scales, recv_count,
                     out_src_idx, out_src_rank, layout_range, slot_of, row_of, num_rows, row_bytes, num_scales, num_topk,
                     num_experts, num_ranks, num_sms, stream)
        self.on_launch("expert_major", stream)
        n, k = num_rows, num_topk
        ids = raw(local_ids, n * k, torch.int64).view(n, k)
        slots = raw(slot_of, n * k, torch.int64).view(n, k)
        rows = raw(x, n * row_bytes, torch.uint8).view(n, row_bytes)
        out_rows = raw(out_x, num_experts * n * row_bytes, torch.uint8).view(num_experts, n, row_bytes)
        src, src_r = raw(src_idx, n, torch.int32), raw(src_rank, n, torch.int32)
        out_src = raw(out_src_idx, num_experts * n, torch.int32).view(num_experts, n)
        out_src_r = raw(out_src_rank, num_experts * n, torch.int32).view(num_experts, n)
        counts = raw(recv_count, num_experts, torch.int32)
        ranges = raw(layout_range, num_experts * num_ranks * 2, torch.int32).view(num_experts, num_ranks, 2)
        if scales:
            row_scales = raw(scales, n * num_scales, torch.float32).view(n, num_scales)
            out_sc = raw(out_scales, num_experts * n * num_scales, torch.float32).view(num_experts, n, num_scales)
        if n:
            assert x % 16 == 0 and out_x % 16 == 0 and row_bytes % 16 == 0, "misaligned 16-byte row copy"
            slots[ids < 0] = -1  # expert 0's block
        for e in range(num_experts):  # one block per expert: rows that chose e, in row order
            hit = (ids == e).any(dim=1).nonzero().flatten() if n else torch.empty(0, dtype=torch.int64)
            count = hit.numel()
            counts[e] = count
            out_rows[e, :count] = rows[hit]
            out_src[e, :count], out_src_r[e, :count] = src[hit], src_r[hit]
            out_src[e, count:], out_src_r[e, count:] = -1, -1
            if scales:
                out_sc[e, :count] = row_scales[hit]
            per_source = torch.bincount(src_r[hit].long(), minlength=num_ranks)[:num_ranks].to(torch.int32)
            ranges[e, :, 1] = per_source
            ranges[e, :, 0] = torch.cumsum(per_source, dim=0, dtype=torch.int32) - per_source
            slot_in_e = torch.full((n,), -1, dtype=torch.int64)
            slot_in_e[hit] = torch.arange(count)
            chose = ids == e
            slots[chose] = (e * n + slot_in_e).unsqueeze(1).expand(n, k)[chose]

    def per_token_cast_fp8(self, x: int, dtype: int, num_tokens: int, hidden: int, out_fp8: int, out_scales: int,
                           num_sms: int, stream: int) -> None:
        call_binding(self.real.per_token_cast_fp8, x, dtype, num_tokens, hidden, out_fp8, out_scales, num_sms, stream)
        if num_tokens == 0:
            return  # the launcher returns before launching
        self.on_launch("per_token_cast_fp8", stream)
        num_blocks = (hidden + FP8_BLOCK - 1) // FP8_BLOCK
        values = raw(x, num_tokens * hidden, COMBINE_DTYPES[dtype]).view(num_tokens, hidden)
        out = raw(out_fp8, num_tokens * hidden, torch.float8_e4m3fn).view(num_tokens, hidden)
        scales = raw(out_scales, num_tokens * num_blocks, torch.float32).view(num_tokens, num_blocks)
        for t in range(num_tokens):
            for b in range(num_blocks):  # one warp; channels past `hidden` load as 0
                vals = values[t, b * FP8_BLOCK : (b + 1) * FP8_BLOCK].float()
                amax = vals.abs().max()
                scale = torch.maximum(amax, torch.tensor(1e-4, dtype=torch.float32)) / FP8_MAX
                # __nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3): round to nearest, clamp to +-448.
                out[t, b * FP8_BLOCK : b * FP8_BLOCK + vals.numel()] = (vals / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                scales[t, b] = scale

    def get_dispatch_layout(self, topk_idx: int, num_tokens: int, num_topk: int, num_experts: int, num_ranks: int,
                            num_tokens_per_rank: int, num_tokens_per_expert: int, is_token_in_rank: int, num_sms: int,
                            stream: int) -> None:
        call_binding(self.real.get_dispatch_layout, topk_idx, num_tokens, num_topk, num_experts, num_ranks,
                     num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_sms, stream)
        self.on_launch("zero_counts", stream)
        # The launcher's check after the first launch, which the real binding cannot reach without a device:
        if (num_ranks + num_experts) * 4 > 48 * 1024:
            raise RuntimeError("num_experts too large for the layout kernel's shared memory")
        per_rank = raw(num_tokens_per_rank, num_ranks, torch.int32)
        per_expert = raw(num_tokens_per_expert, num_experts, torch.int32)
        per_rank.zero_()
        per_expert.zero_()
        if num_tokens == 0:
            return
        self.on_launch("layout", stream)
        ids = raw(topk_idx, num_tokens * num_topk, torch.int64).tolist()
        in_rank = raw(is_token_in_rank, num_tokens * num_ranks, torch.bool)
        experts_per_rank = num_experts // num_ranks
        for t in range(num_tokens):
            seen = 0
            for k in range(num_topk):
                e = ids[t * num_topk + k]
                if e < 0 or e >= num_experts:
                    continue
                per_expert[e] += 1
                seen |= 1 << (e // experts_per_rank)
            for r in range(num_ranks):
                hit = bool((seen >> r) & 1)
                in_rank[t * num_ranks + r] = hit
                per_rank[r] += int(hit)

    # -- csrc/kernels/copy.cu ----------------------------------------------------------------------------

    def routing_plan(self, is_token_in_rank: int, num_tokens: int, num_ranks: int, send_pos: int, send_token_idx: int,
                     num_sent: int, recv_counts: int, expert_counts: int, num_local_experts: int, num_sms: int,
                     stream: int) -> None:
        """launch_routing_plan: positions by a scan down each rank's column, the sent tokens rank-major."""
        call_binding(self.real.routing_plan, is_token_in_rank, num_tokens, num_ranks, send_pos, send_token_idx, num_sent,
                     recv_counts, expert_counts, num_local_experts, num_sms, stream)
        self.on_launch("routing_plan", stream)
        raw(recv_counts, num_ranks, torch.int32).zero_()
        raw(expert_counts, num_local_experts, torch.int32).zero_()
        in_rank = raw(is_token_in_rank, num_tokens * num_ranks, torch.bool).view(num_tokens, num_ranks)
        positions = torch.cumsum(in_rank, dim=0, dtype=torch.int32) - 1
        raw(send_pos, num_tokens * num_ranks, torch.int32).view(num_tokens, num_ranks)[:] = torch.where(in_rank, positions, -1)
        if num_sent:
            listed = raw(send_token_idx, num_sent, torch.int64)
            tokens = in_rank.t().nonzero()[:num_sent, 1]
            listed.fill_(-1)
            listed[: tokens.numel()] = tokens

    def sm_copy(self, dst: int, src: int, nbytes: int, num_sms: int, stream: int) -> None:
        """launch_sm_copy: the copy-bandwidth baseline of the CUDA bench (16-byte vectors, tail bytewise)."""
        call_binding(self.real.sm_copy, dst, src, nbytes, num_sms, stream)
        if nbytes == 0:
            return  # the launcher returns before launching
        self.on_launch("sm_copy", stream)
        ctypes.memmove(dst, src, nbytes)

    # -- csrc/runtime/memory.cpp ------------------------------------------------------------------------

    def device_alloc_zeroed(self, device: int, nbytes: int) -> int:
        call_binding(self.real.device_alloc_zeroed, device, nbytes)
        return self.memory.alloc_zeroed(nbytes)

    def device_free(self, device: int, ptr: int) -> None:
        call_binding(self.real.device_free, device, ptr)
        self.memory.free(ptr)

    def ipc_get_handle(self, device: int, ptr: int) -> bytes:
        call_binding(self.real.ipc_get_handle, device, ptr)
        return self.memory.ipc_handle(ptr)

    def ipc_open_handle(self, device: int, handle: bytes) -> int:
        call_binding(self.real.ipc_open_handle, device, handle)
        return self.memory.ipc_open(handle)

    def ipc_close_handle(self, device: int, ptr: int) -> None:
        call_binding(self.real.ipc_close_handle, device, ptr)
        self.memory.ipc_close(ptr)


# The kernel launchers, then the memory functions, of moe_comm._C that the model replaces.
LAUNCHERS = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "expert_major", "low_latency_combine_send",
             "low_latency_combine_recv", "per_token_cast_fp8", "get_dispatch_layout", "routing_plan", "sm_copy")
MODELLED = (*LAUNCHERS, "device_alloc_zeroed", "device_free", "ipc_get_handle", "ipc_open_handle", "ipc_close_handle")


def model_extension(model: KernelModel) -> ModuleType:
    """A stand-in for ``moe_comm._C``: the real module's constants and layout functions, the model's launchers
    and memory functions, and one device (``device_status() == "ok"``). Anything else (``barrier``, which no
    host code calls, and ``device_attribute``) is the real binding and fails for lack of a device."""
    module = ModuleType("moe_comm._C", "moe_comm._C modelled by tests/cuda_model/kernels.py (no CUDA code runs)")
    for name in dir(model.real):
        if not name.startswith("__"):
            setattr(module, name, getattr(model.real, name))
    for name in MODELLED:
        setattr(module, name, getattr(model, name))
    module.device_status = lambda: "ok"
    module.device_count = lambda: 1
    return module
