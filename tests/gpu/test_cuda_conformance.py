"""The portable backend's conformance checks (tests/conformance.py) against ``backend="cuda"``.

Ranks are separate processes sharing the one GPU (gloo for the host-side exchanges, CUDA IPC between the
processes' symmetric buffers): the real multi-process code path, time-sliced by the driver. Skipped without
a GPU or the extension.
"""

from __future__ import annotations

import pytest

from tests.gpu import skip_module_without_cuda

pytestmark = pytest.mark.gpu

skip_module_without_cuda()


from tests.conformance import conformance_tests  # noqa: E402
from tests.harness import pool_fixture  # noqa: E402

pool = pool_fixture(2, 4, timeout_s=180.0)
globals().update(conformance_tests("cuda"))
