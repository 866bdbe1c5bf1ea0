"""The portable backend's compiled CPU kernels (``moe_comm._cpu``, csrc/cpu/), optional.

- ``bag_sum``: combine's reduction on CPU ranks: each token's returned rows summed in float32 (float64 for
  float64 rows) in rank order, plus the biases, rounded once to nearest even, in one pass over the rows.
- ``localize_topk``: the received top-k ids made local, their weights masked and the experts counted.

Their results are bitwise those of the pure-PyTorch code, which remains the path wherever the extension is
not built (no C++ compiler at install time) or ``MOE_COMM_CPU_KERNELS=0`` is set.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

__all__ = ["available", "bag_sum", "forced_off", "localize_topk"]

_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}

_module: ModuleType | None = None
_import_error: str | None = None
_forced_off = os.environ.get("MOE_COMM_CPU_KERNELS", "1") == "0"


def _load() -> ModuleType | None:
    """``moe_comm._cpu``, or the build at ``$MOE_COMM_CPU_MODULE`` (scripts/cpu_asan.sh: a sanitizer build)."""
    global _module, _import_error
    if _module is None and _import_error is None:
        path = os.environ.get("MOE_COMM_CPU_MODULE")
        try:
            if path:
                spec = importlib.util.spec_from_file_location("moe_comm._cpu", path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"MOE_COMM_CPU_MODULE={path}: not an extension module")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _module = module
            else:
                _module = importlib.import_module("moe_comm._cpu")
        except ImportError as exc:
            _import_error = str(exc)
    return _module


def available() -> tuple[bool, str]:
    """Whether the kernels run compiled, and why not when they do not."""
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


def _require(name: str) -> ModuleType:
    ok, why = available()
    if not ok:
        raise RuntimeError(f"moe_comm.cpu_kernels.{name}: {why}")
    assert _module is not None
    return _module


def _check(checks: Sequence[tuple[torch.Tensor, str, torch.dtype, tuple[int, ...]]], contiguous: bool = True) -> None:
    """Each ``(tensor, name, dtype, shape)``: on the CPU, contiguous (rows may be strided otherwise), as given."""
    for tensor, name, dtype, shape in checks:
        if tensor.device.type != "cpu":
            raise ValueError(f"{name}: must be a CPU tensor, got {tensor.device}")
        if (contiguous and not tensor.is_contiguous()) or (tensor.dim() > 0 and tensor.stride(-1) != 1):
            raise ValueError(f"{name}: must be a contiguous CPU tensor" if contiguous else f"{name}: each row must be contiguous")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")


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
    module = _require("bag_sum")
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
    _check(checks)
    bias_ptrs = [b.data_ptr() for b in biases] + [0] * (2 - len(biases))
    module.bag_sum(
        rows.data_ptr(), _DTYPE_CODES[rows.dtype], rows.shape[0], hidden,
        element_row.data_ptr(), element_row.numel(), bag_end.data_ptr(), num_tokens,
        bias_ptrs[0], bias_ptrs[1], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def localize_topk(
    global_ids: torch.Tensor,
    weights: torch.Tensor | None,
    first_expert: int,
    num_local_experts: int,
    local_ids: torch.Tensor,
    local_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Global top-k ids to this rank's local ones, weights masked to match, experts counted; one pass.

    Args:
        global_ids: ``[N, K]`` int32, rows may be strided (a view into a packed side channel).
        weights: ``[N, K]`` float32 or ``None``, rows may be strided.
        first_expert: the global id of this rank's local expert 0.
        num_local_experts: experts per rank.
        local_ids: ``[N, K]`` int64 out: ``id - first_expert`` where that is in ``[0, num_local_experts)``,
            else -1 (so also for -1 and any id outside ``[0, num_experts)``).
        local_weights: ``[N, K]`` float32 out with ``weights`` (both or neither): the weight where the id is
            local, else 0.

    Returns:
        ``[num_local_experts]`` int64: how many (row, k) entries name each local expert.
    """
    module = _require("localize_topk")
    if (weights is None) != (local_weights is None):
        raise ValueError("weights, local_weights: give both or neither")
    shape = tuple(global_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"global_ids: expected [N, K], got {list(shape)}")
    checks = [(global_ids, "global_ids", torch.int32, shape)]
    if weights is not None:
        checks.append((weights, "weights", torch.float32, shape))
    _check(checks, contiguous=False)
    outs = [(local_ids, "local_ids", torch.int64, shape)]
    if local_weights is not None:
        outs.append((local_weights, "local_weights", torch.float32, shape))
    _check(outs)
    counts = torch.empty(num_local_experts, dtype=torch.int64)
    module.localize_topk(
        global_ids.data_ptr(), global_ids.stride(0), weights.data_ptr() if weights is not None else 0,
        weights.stride(0) if weights is not None else 0, shape[0], shape[1], first_expert, num_local_experts,
        local_ids.data_ptr(), local_weights.data_ptr() if local_weights is not None else 0, counts.data_ptr(),
    )  # fmt: skip
    return counts
