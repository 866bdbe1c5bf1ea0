"""Environment variables the library reads, in one place.

They are read once, when first asked for, and never written. Every variable is optional.

- ``MOE_COMM_TIMEOUT_S``: default bound, in seconds, on every wait of a :class:`moe_comm.Buffer`
  (default 120).
- ``MOE_COMM_BACKEND``: backend that ``backend="auto"`` picks when set (``torch`` or ``cuda``).
- ``MOE_COMM_DISABLE_CUDA_EXT``: when ``1``, the CUDA extension is not imported even if built.

Read where they apply (documented there):

- ``MOE_COMM_CPU_KERNELS``, ``MOE_COMM_CPU_MODULE``: :mod:`moe_comm.cpu_kernels` (the compiled CPU kernels).
- ``MOE_COMM_HUGE_PAGES``, ``MOE_COMM_HUGE_PAGE_MIN_BYTES``: :mod:`moe_comm.host_memory` (large CPU outputs
  on transparent huge pages).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

__all__ = ["Settings", "settings"]


@dataclass(frozen=True)
class Settings:
    """Values of the environment variables the library honours."""

    timeout_s: float
    backend: str | None
    disable_cuda_ext: bool


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """Return the library's environment settings, read once per process."""
    timeout = os.environ.get("MOE_COMM_TIMEOUT_S", "")
    return Settings(
        timeout_s=float(timeout) if timeout else 120.0,
        backend=os.environ.get("MOE_COMM_BACKEND") or None,
        disable_cuda_ext=os.environ.get("MOE_COMM_DISABLE_CUDA_EXT", "0") == "1",
    )
