"""Large host tensors on transparent huge pages: fresh outputs that do not fault once per 4 KiB.

Every tensor the portable backend returns is new at each call (the caller owns it). On the host, glibc maps
any allocation above its mmap threshold (32 MiB at most) afresh, so each page of such an output faults and
is zeroed on its first write: on the 2-core development VMs a fresh 210 MiB output (hidden 7168 bf16, the
rows a rank receives at DeepSeek-V3's shape) took 98-114 ms to fill against 15 ms for the copy alone.
Mapped anonymously and advised ``MADV_HUGEPAGE``, it faults once per 2 MiB instead and fills in 20 ms.

- :func:`empty` and :func:`zeros`: ``torch.empty`` / ``torch.zeros`` for CPU tensors of at least
  :func:`min_bytes` where the kernel offers transparent huge pages (``always`` or ``madvise`` in
  ``/sys/kernel/mm/transparent_hugepage/enabled``); the plain torch call everywhere else (CUDA tensors, small
  tensors, other systems). A fresh mapping is zero-filled by the kernel, so :func:`zeros` writes nothing.

The tensor holds the mapping (``torch.frombuffer``), which is unmapped when the last tensor or view of it
dies. Its storage cannot grow: ``resize_`` to more elements raises (``torch.empty``'s would reallocate).

Not where a virtio balloon reports free pages to the hypervisor (``VIRTIO_BALLOON_F_REPORTING``): there a
freed huge page goes back to the host at once and faults through it again when reused. On such a VM (the
development VMs report every free block of 128 KiB at once) dispatch at hidden 7168 took 1050 ms with huge
pages against 453 ms without; with the VM's reporting held back 10 s it took 231 ms against 392 ms.

Environment: ``MOE_COMM_HUGE_PAGES=0`` turns this off, ``=1`` on even where free pages are reported;
``MOE_COMM_HUGE_PAGE_MIN_BYTES`` sets the size from which it applies. The default, 32 MiB, is glibc's largest
mmap threshold: below it glibc's heap recycles freed memory without faults, and a fresh mapping, zeroed 2 MiB
at a time, costs more than it saves (dispatch at hidden 1024, 30 MiB outputs: 4.4 ms more CPU per rank
mapped than from the heap).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import mmap
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["empty", "forced", "huge_pages_available", "min_bytes", "reports_free_pages", "zeros"]

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_BALLOON_FEATURES = "/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"
_VIRTIO_BALLOON_F_REPORTING = 5
_DEFAULT_MIN_BYTES = 32 << 20
_forced_min_bytes: int | None = None


def reports_free_pages() -> bool:
    """Whether a virtio balloon here returns freed guest pages to the hypervisor (feature bit 5, REPORTING)."""
    for path in glob.glob(_BALLOON_FEATURES):
        try:
            with open(path) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > _VIRTIO_BALLOON_F_REPORTING and bits[_VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    return False


@functools.lru_cache(maxsize=1)
def huge_pages_available() -> tuple[bool, str]:
    """Whether :func:`empty` maps large CPU tensors on huge pages here, and why not when it does not."""
    setting = os.environ.get("MOE_COMM_HUGE_PAGES", "auto")
    if setting == "0":
        return False, "disabled by MOE_COMM_HUGE_PAGES=0"
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False, "transparent huge pages are a Linux feature"
    try:
        with open(_THP_ENABLED) as f:
            mode = f.read()
    except OSError as exc:
        return False, f"cannot read {_THP_ENABLED}: {exc.strerror}"
    if "[never]" in mode:
        return False, f"the kernel's transparent huge pages are off ({mode.strip()})"
    if setting != "1" and reports_free_pages():
        return False, ("a virtio balloon reports freed pages to the hypervisor, so reused huge pages fault through "
                       "it again (MOE_COMM_HUGE_PAGES=1 maps them anyway)")
    return True, f"transparent huge pages from {min_bytes() >> 20} MiB ({mode.strip()})"


@functools.lru_cache(maxsize=1)
def min_bytes() -> int:
    """Tensors of at least this many bytes are mapped on huge pages (``MOE_COMM_HUGE_PAGE_MIN_BYTES``)."""
    value = os.environ.get("MOE_COMM_HUGE_PAGE_MIN_BYTES", "")
    return int(value) if value else _DEFAULT_MIN_BYTES


@contextlib.contextmanager
def forced(from_bytes: int = 1) -> Iterator[None]:
    """Within the block, map every CPU tensor of at least ``from_bytes`` bytes, huge pages offered or not
    (tests: the backend's outputs on mappings, at any size)."""
    global _forced_min_bytes
    previous = _forced_min_bytes
    _forced_min_bytes = from_bytes
    try:
        yield
    finally:
        _forced_min_bytes = previous


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor | None:
    """A tensor on a fresh huge-page mapping (zero-filled), or ``None`` where :func:`empty` uses torch."""
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return None
    nbytes = _nbytes(shape, dtype)
    if nbytes == 0:
        return None
    if _forced_min_bytes is not None:
        if nbytes < _forced_min_bytes:
            return None
    elif nbytes < min_bytes() or not huge_pages_available()[0]:
        return None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # advice only: without huge pages, 4 KiB pages
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, huge-page backed when large and on the CPU."""
    mapped = _mapped(tuple(shape), dtype, device)
    return mapped if mapped is not None else torch.empty(shape, dtype=dtype, device=device)


def zeros(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``; a huge-page mapping is already zero."""
    mapped = _mapped(tuple(shape), dtype, device)
    return mapped if mapped is not None else torch.zeros(shape, dtype=dtype, device=device)
