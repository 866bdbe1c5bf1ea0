"""Which backends exist, which can run here, and what ``backend="auto"`` picks."""

from __future__ import annotations

from moe_comm.backends.base import CommBackend
from moe_comm.backends.torch_backend import TorchBackend
from moe_comm.env import settings

__all__ = ["available_backends", "backend_classes", "resolve_backend"]


def backend_classes() -> dict[str, type[CommBackend]]:
    """Every backend this installation knows, by name (the CUDA one only if its module imports)."""
    classes: dict[str, type[CommBackend]] = {TorchBackend.name: TorchBackend}
    try:
        from moe_comm.backends.cuda import CudaBackend
    except ImportError:
        pass
    else:
        classes[CudaBackend.name] = CudaBackend
    return classes


def available_backends() -> dict[str, tuple[bool, str]]:
    """Map each backend name to ``(usable here, reason)``; ``torch`` is always usable."""
    report = {name: cls.available() for name, cls in backend_classes().items()}
    report.setdefault("cuda", (False, "the CUDA backend module is not present in this installation"))
    return report


def resolve_backend(name: str, *, is_nccl: bool) -> type[CommBackend]:
    """The backend class for ``name`` (``"auto"``: ``cuda`` when usable with an NCCL group and validated on a
    GPU (``CudaBackend.auto_select``), else ``torch``)."""
    classes = backend_classes()
    if name == "auto":
        forced = settings().backend
        if forced:
            name = forced
        else:
            cuda = classes.get("cuda")
            if is_nccl and cuda is not None and getattr(cuda, "auto_select", True) and cuda.available()[0]:
                return cuda
            return TorchBackend
    if name not in classes:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {sorted(classes) + ['auto']}")
    usable, reason = classes[name].available()
    if not usable:
        raise ValueError(f"backend: {name!r} cannot run here: {reason}; use backend='torch' or 'auto'")
    return classes[name]
