"""Conformance of the portable backend on CPU ranks (gloo): group sizes 1, 2, 3, 4 and 8.

The same tests (tests/conformance.py) run against the CUDA backend in tests/gpu/test_cuda_conformance.py.
"""

from __future__ import annotations

from tests.conformance import conformance_tests
from tests.harness import pool_fixture

pool = pool_fixture(1, 2, 3, 4, 8)
globals().update(conformance_tests("torch"))
