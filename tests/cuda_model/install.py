"""Install the kernel model in a rank process and register the ``cuda`` backend on it as ``"cudasim"``.

:func:`install` patches the whole process, so it refuses to run in the test runner itself (other test
modules share that process); tests/test_cuda_model.py calls it from rank bodies, in the processes of a
:class:`moe_comm.launch.RankPool`. It:

* replaces ``moe_comm._C`` in ``sys.modules`` by :func:`tests.cuda_model.kernels.model_extension` (the real
  extension, found with ``importlib.util.find_spec("moe_comm._C")``, supplies constants, layout arithmetic and
  the argument checks of every launcher);
* replaces ``torch.cuda`` streams and events by the ordering-recording fakes of :mod:`tests.cuda_model.streams`,
  makes ``torch.cuda.is_available()`` true (and ``is_current_stream_capturing()`` false), ``current_device()`` 0 and ``synchronize()`` a no-op (the model's
  kernels complete at their launch), gives the one device a name and :data:`MODEL_SM_COUNT` SMs
  (``get_device_name``, ``get_device_properties``), and makes ``Tensor.pin_memory()`` a plain copy;
* puts the symmetric buffers' small host-side tensors on the CPU and drops the two "is this a CUDA tensor"
  checks of the host code (``cuda_dispatch_layout``, ``per_token_cast_fp8``), recompiling those functions from
  their own current source without the check, so every other line is the repository's;
* registers :class:`ModelCudaBackend`: :class:`moe_comm.backends.cuda.CudaBackend` unchanged except that its
  tensors live on the host. ``Buffer(backend="cudasim")`` then runs the real host code on CPU tensors.

Host code that names the device itself (the single-GPU emulator's default device, the CUDA bench's
``device="cuda"`` tensors and generator) runs inside :func:`cuda_tensors_on_host`, which puts those tensors on
the host too; it is entered around such code only, so the backend tests keep failing loudly on a CUDA tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import multiprocessing
import re
import sys
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moe_comm.backends import cuda as cuda_backend
from moe_comm.backends import cuda_intranode, cuda_memory, registry
from moe_comm.backends.base import BackendContext
from tests.cuda_model.kernels import DeviceMemory, KernelModel, model_extension
from tests.cuda_model.simt import simt_extension
from tests.cuda_model.streams import FakeEvent, FakeStream, StreamTracker

__all__ = ["MODEL_BACKEND", "MODEL_DEVICE_NAME", "MODEL_SM_COUNT", "ModelConfig", "ModelCudaBackend", "cuda_tensors_on_host",
           "install", "installed", "launcher_replaced", "stream_tracker"]

MODEL_BACKEND = "cudasim"
MODEL_DEVICE_NAME = "kernel model (tests/cuda_model, no GPU)"
MODEL_SM_COUNT = 132  # an H100/H200's SMs: what the bench's SM sweep is bounded by


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What every rank of one pool must agree on.

    Attributes:
        memory_dir: the directory holding the model's "device memory" files (one per allocation, named by
            the allocating process); its owner (the test fixture) removes it with everything in it.
        kernels: ``"python"``, the transcriptions of :mod:`tests.cuda_model.kernels`, or ``"simt"``, the CUDA
            source itself on CPU fibers (:mod:`tests.cuda_model.simt`).
        order: with ``"simt"``, the order of blocks and threads (:data:`tests.cuda_model.simt.ORDERS`).
    """

    memory_dir: str
    kernels: str = "python"
    order: str = "forward"


@dataclasses.dataclass(frozen=True)
class _Installed:
    config: ModelConfig
    extension: ModuleType
    tracker: StreamTracker


_installed: _Installed | None = None


class ModelCudaBackend(cuda_backend.CudaBackend):
    """The ``cuda`` backend on the kernel model: the real class, with its tensors on the host.

    ``CudaBackend.__init__`` runs unchanged on a context that names device ``cuda:0``; afterwards the backend's
    device is the Buffer's (the CPU), where the model's kernels read and write.
    """

    name = MODEL_BACKEND

    def __init__(self, context: BackendContext) -> None:
        super().__init__(dataclasses.replace(context, device=torch.device("cuda", 0)))
        self.context = context
        self._device = context.device


def _without_device_check(function: Callable[..., Any], check: str) -> None:
    """Recompile module-level ``function`` from its current source with the text ``check`` removed, in its own
    module (line numbers kept, so tracebacks point at the real file), and rebind it in every ``moe_comm``
    module that imported it by name already (``cuda_emulator`` imports ``cuda_dispatch_layout``)."""
    lines, first_line = inspect.getsourcelines(function)
    source = "".join(lines)
    if source.count(check) != 1:
        raise RuntimeError(f"{function.__module__}.{function.__qualname__} no longer contains {check!r} exactly once; "
                           "update tests/cuda_model/install.py")
    filename = inspect.getsourcefile(function)
    assert filename is not None
    # compile() inherits this module's `from __future__ import annotations`, which the host modules use too.
    code = compile("\n" * (first_line - 1) + source.replace(check, ""), filename, "exec")
    exec(code, function.__globals__)  # noqa: S102 - the repository's own source, minus one condition
    replacement = function.__globals__[function.__name__]
    for name, module in list(sys.modules.items()):
        if (name == "moe_comm" or name.startswith("moe_comm.")) and getattr(module, function.__name__, None) is function:
            setattr(module, function.__name__, replacement)


def _real_extension() -> ModuleType:
    spec = importlib.util.find_spec("moe_comm._C")
    if spec is None or spec.loader is None:
        raise RuntimeError("moe_comm._C is not built (install with nvcc on PATH), so there is nothing to model")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    if real.device_status() == "ok":
        raise RuntimeError("a CUDA device is usable here: the model calls the real launchers first, which would "
                           "launch the kernels on host pointers; run tests/gpu instead")
    return real


def install(config: ModelConfig) -> None:
    """Install the model in this process (see the module docstring). Idempotent for one ``config``."""
    global _installed
    if _installed is not None:
        if _installed.config != config:
            raise RuntimeError(f"the kernel model is installed with {_installed.config}, not {config}")
        return
    if multiprocessing.parent_process() is None:
        raise RuntimeError("install() patches torch and sys.modules for the whole process: call it in a spawned "
                           "rank process, never in the test runner")
    real = _real_extension()
    tracker = StreamTracker()
    model = KernelModel(real, DeviceMemory(config.memory_dir), on_launch=tracker.record_launch)
    if config.kernels == "simt":
        extension = simt_extension(model, config.order)
    elif config.kernels == "python":
        extension = model_extension(model)
    else:
        raise ValueError(f"kernels: expected 'python' or 'simt', got {config.kernels!r}")
    sys.modules["moe_comm._C"] = extension

    torch.cuda.is_available = lambda: True
    torch.cuda.is_current_stream_capturing = lambda: False  # never capturing; a CUDA build would ask the driver
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = lambda device=None, priority=0: FakeStream(tracker, device, priority)
    torch.cuda.Event = lambda enable_timing=False, blocking=False, interprocess=False: FakeEvent(tracker, enable_timing)
    torch.cuda.current_stream = lambda device=None: tracker.current()
    torch.cuda.stream = tracker.use
    torch.Tensor.pin_memory = lambda self, device=None: self.clone()
    properties = SimpleNamespace(name=MODEL_DEVICE_NAME, multi_processor_count=MODEL_SM_COUNT, major=9, minor=0,
                                 total_memory=141 * 2**30)
    torch.cuda.get_device_properties = lambda device=None: properties
    torch.cuda.get_device_name = lambda device=None: MODEL_DEVICE_NAME

    _without_device_check(cuda_backend.cuda_dispatch_layout, " or not topk_idx.is_cuda")
    _without_device_check(cuda_intranode.per_token_cast_fp8, " or not x.is_cuda")
    symmetric_buffer_init = cuda_memory.SymmetricBuffer.__init__

    def symmetric_buffer_on_host(self: cuda_memory.SymmetricBuffer, **kwargs: Any) -> None:
        symmetric_buffer_init(self, **{**kwargs, "device": torch.device("cpu")})

    cuda_memory.SymmetricBuffer.__init__ = symmetric_buffer_on_host
    backend_classes = registry.backend_classes
    registry.backend_classes = lambda: {**backend_classes(), MODEL_BACKEND: ModelCudaBackend}
    _installed = _Installed(config, extension, tracker)


def installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return _installed is not None


def stream_tracker() -> StreamTracker:
    """The installed model's streams and launch log."""
    assert _installed is not None, "the kernel model is not installed in this process"
    return _installed.tracker


@contextlib.contextmanager
def launcher_replaced(name: str, replace: Callable[[Callable[..., None]], Callable[..., None]]) -> Iterator[None]:
    """In the body, the modelled ``moe_comm._C.<name>`` is ``replace(original)`` (to plant a fault)."""
    assert _installed is not None, "the kernel model is not installed in this process"
    original = getattr(_installed.extension, name)
    setattr(_installed.extension, name, replace(original))
    try:
        yield
    finally:
        setattr(_installed.extension, name, original)


# ----------------------------------------------------------------------------------------------------
# CUDA tensors on the host

_CUDA_NAME = re.compile(r"cuda(:\d+)?")


def _on_host(value: Any) -> Any:
    """``value`` with a CUDA device (``torch.device``, ``"cuda[:n]"``) replaced by the CPU; anything else as is."""
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and _CUDA_NAME.fullmatch(value):
        return "cpu"
    return value


class _HostTensors(TorchFunctionMode):
    """Every torch call that names a CUDA device (``device=`` of a factory, ``Tensor.to(device)``) gets the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs:
            device = kwargs["device"]
            kwargs = {**kwargs, "device": "cpu" if isinstance(device, int) else _on_host(device)}
        return func(*(_on_host(a) for a in args), **kwargs)


class _HostGenerator(torch.Generator):
    """``torch.Generator(device="cuda")``: a CPU generator (tensors made with it are on the host)."""

    def __new__(cls, device: Any = "cpu") -> _HostGenerator:
        return super().__new__(cls, device=_on_host(device))


@contextlib.contextmanager
def cuda_tensors_on_host() -> Iterator[None]:
    """In the body, tensors and generators the code makes on a CUDA device are made on the host (where the
    model's kernels read and write), so host code that names ``"cuda"`` itself runs on the model unchanged."""
    assert _installed is not None, "the kernel model is not installed in this process"
    generator = torch.Generator
    torch.Generator = _HostGenerator
    try:
        with _HostTensors():
            yield
    finally:
        torch.Generator = generator
