"""No call waits forever: a rank whose peers never arrive gets an error naming itself and the step."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moe_comm import Buffer, CommTimeoutError
from tests.harness import pool_fixture

pool = pool_fixture(2)


def _one_rank_missing():
    rank = dist.get_rank()
    buf = Buffer(backend="torch", timeout_s=1.5)
    x = torch.randn(4, 16).bfloat16()
    idx = torch.tensor([[0, 1]] * 4)
    if rank == 1:
        time.sleep(4.0)  # never calls dispatch
        return ("absent", "", 0.0)
    start = time.monotonic()
    try:
        buf.dispatch(x, topk_idx=idx, num_experts=2)
    except CommTimeoutError as exc:
        return (type(exc).__name__, str(exc), time.monotonic() - start)
    return ("ok", "", time.monotonic() - start)


def test_missing_peer_times_out_with_rank_and_step(pool):
    kind, message, elapsed = pool.run(_one_rank_missing, timeout_s=60)[0]
    assert kind == "CommTimeoutError"
    assert "rank 0" in message and "dispatch" in message and "agreement" in message
    assert 1.0 <= elapsed < 10.0
