"""The portable backend on CUDA tensors: the conformance checks (tests/conformance.py) in a world of one NCCL
rank, since one GPU cannot hold two NCCL ranks. Every device-side path of ``backend="torch"`` (layout, exact
and worst-case dispatch, the combine reduction at the source, low-latency mode, FP8) then runs on the GPU;
the exchanges between ranks are covered on CPU by tests/test_conformance.py. Skipped without a GPU.
"""

from __future__ import annotations

import pytest

from tests.gpu import skip_module_without_cuda

pytestmark = pytest.mark.gpu

skip_module_without_cuda(extension=False)

from tests.conformance import conformance_tests  # noqa: E402
from tests.harness import pool_fixture  # noqa: E402

pool = pool_fixture(1, timeout_s=180.0, backend="nccl")
globals().update(conformance_tests("torch"))
