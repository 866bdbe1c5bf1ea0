"""DualPipe on 8 CPU ranks (the largest group the issue asks for), against the single-process reference."""

from __future__ import annotations

from tests.harness import pool_fixture
from tests.test_dualpipe_pipeline import _dualpipe

pool = pool_fixture(8, timeout_s=240.0)


def test_dualpipe_8_ranks_matches_reference(pool):
    assert all(pool.run(_dualpipe, 16, timeout_s=240.0))
