"""The portable backend's compiled CPU kernel (``moe_comm._cpu``, csrc/cpu/), optional.

``bag_sum`` is combine's reduction on CPU ranks: each token's returned rows summed in float32 (float64 for
float64 rows) in rank order, plus the biases, rounded once to nearest even, in one pass over the rows. The
results are bitwise those of the pure-PyTorch reduction, which remains the path wherever the extension is
not built (no C++ compiler at install time) or ``MOE_COMM_CPU_KERNELS=0`` is set.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

__all__ = ["available", "bag_sum", "forced_off"]

_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}

_module: ModuleType | None = None
_import_error: str | None = None
_forced_off = os.environ.get("MOE_COMM_CPU_KERNELS", "1") == "0"


def _load() -> ModuleType | None:
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module("moe_comm._cpu")
        except ImportError as exc:
            _import_error = str(exc)
    return _module


def available() -> tuple[bool, str]:
    """Whether ``bag_sum`` runs compiled, and why not when it does not."""
    if _forced_off:
        return False, "disabled by MOE_COMM_CPU_KERNELS=0"
    if _load() is None:
        return False, f"moe_comm._cpu not built ({_import_error})"
    return True, "moe_comm._cpu"


@contextlib.contextmanager
def forced_off(off: bool = True) -> Iterator[None]:
    """Within the block, behave as if the extension were absent (``off=True``) or as the environment says."""
    global _forced_off
    previous = _forced_off
    _forced_off = off
    try:
        yield
    finally:
        _forced_off = previous


def bag_sum(
    rows: torch.Tensor,
    element_row: torch.Tensor,
    bag_end: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out: torch.Tensor,
) -> None:
    """``out[t] = round(0 + rows[element_row[e]] for e in bag t ... + biases[0][t] + biases[1][t])``.

    Args:
        rows: ``[N, H]`` bf16, fp16, fp32 or fp64, contiguous, on the CPU.
        element_row: ``[E]`` int64 row indices in ``[0, N)``, token by token (bag order = summation order).
        bag_end: ``[T]`` int64, non-decreasing: token t's bag is ``element_row[bag_end[t-1]:bag_end[t]]``
            (from 0 for t = 0), and ``bag_end[T-1] == E``.
        biases: up to two ``[T, H]`` tensors of the accumulation dtype (float32, or float64 for fp64 rows).
        out: ``[T, H]`` of ``rows``' dtype, written whole (an empty bag gives the biases, or zeros).

    Raises:
        RuntimeError: when the extension is not available (check :func:`available` first).
        ValueError: naming the argument, for a bad dtype, shape, layout or index.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(f"moe_comm.cpu_kernels.bag_sum: {why}")
    if rows.dtype not in _DTYPE_CODES:
        raise ValueError(f"rows: dtype must be one of {list(_DTYPE_CODES)}, got {rows.dtype}")
    if rows.dim() != 2 or out.dim() != 2:
        raise ValueError(f"rows, out: expected 2-D tensors, got {rows.dim()}-D and {out.dim()}-D")
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    num_tokens, hidden = out.shape[0], rows.shape[1]
    checks = [
        (rows, "rows", rows.dtype, (rows.shape[0], hidden)),
        (element_row, "element_row", torch.int64, (element_row.numel(),)),
        (bag_end, "bag_end", torch.int64, (num_tokens,)),
        (out, "out", rows.dtype, (num_tokens, hidden)),
        *((b, f"biases[{i}]", acc, (num_tokens, hidden)) for i, b in enumerate(biases)),
    ]
    if len(biases) > 2:
        raise ValueError(f"biases: at most 2, got {len(biases)}")
    for tensor, name, dtype, shape in checks:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{name}: must be a contiguous CPU tensor")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
    bias_ptrs = [b.data_ptr() for b in biases] + [0] * (2 - len(biases))
    module = _module
    assert module is not None
    module.bag_sum(
        rows.data_ptr(), _DTYPE_CODES[rows.dtype], rows.shape[0], hidden,
        element_row.data_ptr(), element_row.numel(), bag_end.data_ptr(), num_tokens,
        bias_ptrs[0], bias_ptrs[1], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
