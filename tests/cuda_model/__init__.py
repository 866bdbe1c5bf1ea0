"""A MODEL of the GPU under ``moe_comm._C``, for testing the ``cuda`` backend on CPUs.

The real host code (``moe_comm/backends/cuda.py``, ``cuda_intranode.py``, ``cuda_memory.py``, the Buffer front
end) runs unchanged, one process per rank, with the symmetric buffers shared between the processes, against
one of two sets of kernels: sequential Python transcriptions of the kernels in ``csrc/kernels/``, or the CUDA
source itself compiled for the host and run with a fiber per CUDA thread (``moe_comm._C_simt``, csrc/simt).
This exercises the arguments the host passes, the buffer sizing, the protocol (records, positions, flags,
counts, epochs, the finished-block counter, error records), the stream ordering and, on the simt kernels, the
kernels' own indexing, arithmetic and warp and block collectives on every CI run. Memory ordering on a GPU,
concurrency between blocks and GPUs, and performance need a GPU (``scripts/gpu_check.sh``).

* :mod:`tests.cuda_model.kernels`: the kernel transcriptions and the model's "device memory" and IPC.
* :mod:`tests.cuda_model.simt`: ``moe_comm._C_simt``'s launchers in place of the transcriptions.
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
