"""The repository's kernels themselves as the kernel model's launchers: ``moe_comm._C_simt``.

setup.py builds ``moe_comm._C_simt`` from the same csrc/ sources as ``moe_comm._C``, with the host compiler and
``-DMOE_COMM_SIMT``: its launchers run every kernel on CPU fibers, a fiber per CUDA thread (csrc/simt/simt.h),
straight on the host pointers the model's tensors and "device memory" files have. So with
``ModelConfig(kernels="simt")`` the host code drives the CUDA source, its argument checks, its warp and block
collectives (a divergent one fails the launch) and its protocol between the rank processes, instead of the
Python transcriptions in :mod:`tests.cuda_model.kernels`. Memory (allocation, IPC handles) stays the model's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from tests.cuda_model.kernels import LAUNCHERS, KernelModel, model_extension

__all__ = ["ORDERS", "simt_built", "simt_extension", "simt_module"]

# simt_configure's orders of blocks and of threads at every switch.
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}

# The kernels a launcher launches, in order, where that is not one kernel named as the launcher (a launcher
# that returns early launches a prefix of them: get_dispatch_layout with no tokens only zeroes the counts).
_KERNELS = {"get_dispatch_layout": ("zero_counts", "layout")}


def simt_built() -> bool:
    """Whether :func:`simt_module` has a build to load (``$MOE_COMM_SIMT_MODULE`` or the installed one)."""
    return bool(os.environ.get("MOE_COMM_SIMT_MODULE")) or importlib.util.find_spec("moe_comm._C_simt") is not None


def simt_module() -> ModuleType:
    """``moe_comm._C_simt``: the build at ``$MOE_COMM_SIMT_MODULE`` when set (scripts/simt_asan.sh points it at
    an AddressSanitizer build), else the installed one; a RuntimeError when it was not built."""
    path = os.environ.get("MOE_COMM_SIMT_MODULE")
    if path:
        if "moe_comm._C_simt" not in sys.modules:
            spec = importlib.util.spec_from_file_location("moe_comm._C_simt", path)
            if spec is None or spec.loader is None:
                raise RuntimeError(f"MOE_COMM_SIMT_MODULE={path}: not an extension module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["moe_comm._C_simt"] = module
        return sys.modules["moe_comm._C_simt"]
    try:
        return importlib.import_module("moe_comm._C_simt")
    except ImportError as exc:
        raise RuntimeError("moe_comm._C_simt is not built (setup.py builds it with moe_comm._C)") from exc


def _launcher(simt: ModuleType, name: str, on_launch: Callable[[str, int], None]) -> Callable[..., None]:
    binding = getattr(simt, name)
    kernels = _KERNELS.get(name, (name,))

    def launch(*args: Any) -> None:
        before = simt.simt_launches()
        try:
            binding(*args)
        finally:
            for kernel in kernels[: simt.simt_launches() - before]:
                on_launch(kernel, args[-1])  # every launcher takes the stream last

    launch.__name__ = name
    launch.__doc__ = f"moe_comm._C_simt.{name}: the CUDA source of the launcher and its kernels, on CPU fibers."
    return launch


def simt_extension(model: KernelModel, order: str = "forward", seed: int = 0) -> ModuleType:
    """:func:`tests.cuda_model.kernels.model_extension` with every launcher replaced by ``moe_comm._C_simt``'s,
    its blocks and threads run in ``order`` (one of :data:`ORDERS`, shuffled with ``seed``)."""
    simt = simt_module()
    simt.simt_configure(ORDERS[order], seed)
    module = model_extension(model)
    module.__doc__ = "moe_comm._C with the kernels of moe_comm._C_simt (csrc/ on CPU fibers) and the model's memory"
    for name in LAUNCHERS:
        setattr(module, name, _launcher(simt, name, model.on_launch))
    return module
