"""Multi-rank test harness: ranks are started once per test module and reused by every test body.

A test module declares a pool fixture and sends module-level functions to it::

    pool = pool_fixture(2, 4)          # module-scoped, parametrized over world sizes

    def _check_roundtrip(seed):        # runs on every rank, inside an initialised gloo group
        ...

    def test_roundtrip(pool):
        pool.run(_check_roundtrip, seed=0)

A failure on any rank fails the test with that rank's traceback; every run has a timeout.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moe_comm.launch import RankPool


def pool_fixture(*world_sizes: int, timeout_s: float = 120.0, backend: str = "gloo"):
    """Return a module-scoped pytest fixture yielding a :class:`RankPool` (of ``backend``) for each world size."""

    @pytest.fixture(scope="module", params=list(world_sizes), ids=[f"ranks{n}" for n in world_sizes])
    def _pool(request: pytest.FixtureRequest) -> Iterator[RankPool]:
        with RankPool(request.param, backend=backend, default_timeout_s=timeout_s) as pool:
            yield pool

    return _pool
