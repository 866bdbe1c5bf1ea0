"""Read and write the protocol headers of a :class:`~moe_comm.backends.cuda_emulator.MultiRankEmulator`'s ranks.

Used by tests/gpu/test_cuda_emulator.py on a GPU and by its mirror on the kernel model
(tests/cuda_model/emulator_checks.py), where the same calls reach the model's ``sm_copy`` and host memory;
:func:`write_epochs` also by the model's Buffer-level wrap check (tests/cuda_model/checks.py).
"""

from __future__ import annotations

import torch

from moe_comm.backends import cuda_memory
from moe_comm.backends.cuda_emulator import MultiRankEmulator
from moe_comm.backends.cuda_memory import SymmetricBuffer


def header(buf: SymmetricBuffer, values: torch.Tensor | None = None) -> torch.Tensor:
    """Rank buffer `buf`'s header as int32 [HEADER_BYTES / 4] (a copy on its device); with `values` (the same
    shape and dtype, on that device), first write them over it. Synchronises the device."""
    ext = cuda_memory._ext()
    stream = torch.cuda.current_stream(buf.device).cuda_stream
    if values is not None:
        ext.sm_copy(buf.base, values.data_ptr(), ext.HEADER_BYTES, 1, stream)
    copy = torch.empty(ext.HEADER_BYTES // 4, dtype=torch.int32, device=buf.device)
    ext.sm_copy(copy.data_ptr(), buf.base, ext.HEADER_BYTES, 1, stream)
    torch.cuda.synchronize(buf.device)
    return copy


def kernel_epochs(buf: SymmetricBuffer) -> list[int]:
    """The epoch each protocol kernel last completed on this rank, in KERNEL_IDS order."""
    ext = cuda_memory._ext()
    start = dict(ext.HEADER_SLOTS)["epochs"]
    return header(buf)[start : start + len(ext.KERNEL_IDS)].tolist()


def write_epochs(values: torch.Tensor, num_ranks: int, epoch: int) -> None:
    """Into `values` (int32, a rank's header from its start, at least up to the launch_failed slots): every
    protocol kernel's epoch, and the flags and free slots of all `num_ranks` peers, at `epoch`."""
    ext = cuda_memory._ext()
    slots = dict(ext.HEADER_SLOTS)
    for name in ("dispatch_flag", "dispatch_free", "combine_flag", "combine_free"):
        values[slots[name] : slots[name] + num_ranks] = epoch
    values[slots["epochs"] : slots["epochs"] + len(ext.KERNEL_IDS)] = epoch


def set_epochs(emu: MultiRankEmulator, epoch: int) -> None:
    """As if every protocol kernel had run `epoch` times on every rank (write_epochs). The emulator must be idle."""
    for buf in emu.buffers:
        values = header(buf)
        write_epochs(values, emu.num_ranks, epoch)
        header(buf, values)
