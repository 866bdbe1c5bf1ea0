"""A Python MODEL of the CUDA kernels of ``moe_comm._C``, for testing the ``cuda`` backend's host code on CPUs.

The real host code (``moe_comm/backends/cuda.py``, ``cuda_intranode.py``, ``cuda_memory.py``, the Buffer front
end) runs unchanged against sequential Python transcriptions of the kernels in ``csrc/kernels/``, one process
per rank, with the symmetric buffers shared between the processes. This exercises the arguments the host
passes, the buffer sizing, the protocol (records, positions, flags, counts, epochs, the finished-block
counter, error records) and the stream ordering on every CI run. It does NOT test the CUDA code itself:
memory ordering, concurrency between blocks and GPUs, performance and the kernels' compiled arithmetic need
a GPU (``scripts/gpu_check.sh``).

* :mod:`tests.cuda_model.kernels`: the kernel transcriptions and the model's "device memory" and IPC.
* :mod:`tests.cuda_model.streams`: fake CUDA streams and events that record what each stream waited for.
* :mod:`tests.cuda_model.install`: puts both in place in a rank process and registers backend ``"cudasim"``.
* :mod:`tests.cuda_model.checks`: rank bodies run by ``tests/test_cuda_model.py``.
* :mod:`tests.cuda_model.emulator_checks`: bodies run by ``tests/test_cuda_model_emulator.py`` (the single-GPU
  emulator and the CUDA bench suite, in one process).

Importing these modules changes nothing; only :func:`tests.cuda_model.install.install` patches, and it
refuses to run outside a spawned process.
"""


def skip_module_unless_modelled() -> None:
    """Skip the calling test module when there is nothing to model (``moe_comm._C`` not built) or when a CUDA
    device is usable (there tests/gpu runs the real kernels, and the model would launch them on host pointers)."""
    import importlib

    import pytest
    import torch

    try:
        importlib.import_module("moe_comm._C")
    except ImportError as exc:
        pytest.skip(f"moe_comm._C is not built (no nvcc at install time): {exc}", allow_module_level=True)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is usable: tests/gpu runs the real kernels (the model would launch them on host pointers)",
                    allow_module_level=True)
