"""The CUDA-kernel backend (``backend="cuda"``): kernels in ``moe_comm._C``, built from csrc/ by setup.py.

Status: the extension builds (sm_90 by default) and provides the on-device layout kernel and an SM-bounded
copy kernel (the bench baseline). The intranode dispatch/combine kernels described in docs/kernels.md are
NOT in the tree yet, so :meth:`CudaBackend.available` reports the backend unusable with that reason and the
Buffer keeps using the portable ``torch`` backend. ``cuda_dispatch_layout`` is usable on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from moe_comm.backends.base import (
    CombineOutput,
    CombineRequest,
    CommBackend,
    DispatchOutput,
    DispatchRequest,
    LowLatencyDispatchOutput,
)

__all__ = ["CudaBackend", "cuda_dispatch_layout", "extension", "extension_status", "sm_copy"]

_KERNELS_MISSING = "the intranode dispatch/combine kernels are not implemented yet (only layout and copy kernels)"


def extension() -> Any | None:
    """The compiled ``moe_comm._C`` module, or ``None`` when it was not built."""
    try:
        return importlib.import_module("moe_comm._C")
    except ImportError:
        return None


def extension_status() -> tuple[bool, str]:
    """``(extension importable and a CUDA device usable, reason)``."""
    ext = extension()
    if ext is None:
        return False, "moe_comm._C is not built (install with nvcc on PATH: pip install -e .)"
    status = ext.device_status()
    if status != "ok":
        return False, f"moe_comm._C built for {ext.compiled_architectures()} but {status}"
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    return True, f"moe_comm._C built for {ext.compiled_architectures()}"


def _require() -> Any:
    ok, reason = extension_status()
    if not ok:
        raise RuntimeError(f"cuda backend: {reason}")
    return extension()


def cuda_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_sms: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layout on device: ``topk_idx [T, K] int64`` -> ``(per_rank [R] int32, per_expert [E] int32, in_rank [T, R] bool)``."""
    ext = _require()
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64 or not topk_idx.is_cuda:
        raise ValueError("topk_idx: expected a [T, K] int64 CUDA tensor")
    topk_idx = topk_idx.contiguous()
    t, k = topk_idx.shape
    dev = topk_idx.device
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=dev)
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
    in_rank = torch.empty(t, num_ranks, dtype=torch.bool, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    ext.get_dispatch_layout(topk_idx.data_ptr(), t, k, num_experts, num_ranks, per_rank.data_ptr(),
                            per_expert.data_ptr(), in_rank.data_ptr(), num_sms, stream)
    return per_rank, per_expert, in_rank


def sm_copy(dst: torch.Tensor, src: torch.Tensor, num_sms: int) -> None:
    """Copy ``src`` into ``dst`` (same byte size, CUDA, contiguous) with a grid of ``num_sms`` blocks."""
    ext = _require()
    if dst.nbytes != src.nbytes or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("sm_copy: dst and src must be contiguous with the same byte size")
    ext.sm_copy(dst.data_ptr(), src.data_ptr(), src.nbytes, num_sms, torch.cuda.current_stream(src.device).cuda_stream)


class CudaBackend(CommBackend):
    """CUDA-kernel backend; unusable until the dispatch/combine kernels land (see module docstring)."""

    name = "cuda"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, reason = extension_status()
        if not ok:
            return False, reason
        return False, _KERNELS_MISSING

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cuda_dispatch_layout(topk_idx, num_experts, self.context.world_size, self.context.num_sms)

    def dispatch(self, request: DispatchRequest) -> DispatchOutput:
        raise NotImplementedError(f"cuda backend: {_KERNELS_MISSING}")

    def combine(self, request: CombineRequest) -> CombineOutput:
        raise NotImplementedError(f"cuda backend: {_KERNELS_MISSING}")

    def low_latency_dispatch(self, *args: Any, **kwargs: Any) -> LowLatencyDispatchOutput:
        raise NotImplementedError(f"cuda backend: {_KERNELS_MISSING}")

    def low_latency_combine(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"cuda backend: {_KERNELS_MISSING}")
