"""Host-side staging for the portable backend: per-row side channels, reusable buffers, row offsets.

Legend: R ranks, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_comm import host_memory
from moe_comm.collectives import as_bytes

__all__ = ["ScratchPool", "SideChannel", "row_offsets", "row_ranges"]


def row_offsets(counts: Sequence[int]) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: where each rank's rows start (and the last one ends)."""
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return bounds


def row_ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` per rank: the row range of each rank's count in rank order."""
    bounds = row_offsets(counts)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class SideChannel:
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


class ScratchPool:
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
