"""Timing collectives fairly: every rank starts together, an iteration lasts as long as its slowest rank."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["time_interleaved"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    ops: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    iters: int,
    group: dist.ProcessGroup | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several collective operations in alternation, so that they see the same machine state.

    Each iteration runs every op once, in order on even iterations and in reverse order on odd ones (so
    that an op and the baseline next to it take each position equally often); each run is bracketed by a
    barrier and a device synchronisation and its time is the maximum over ranks (a collective lasts as long
    as its slowest rank).

    Args:
        ops: name -> zero-argument callable that runs the operation to completion.
        device: where the operations run (synchronised around each run).
        warmup: untimed iterations first.
        iters: timed iterations.
        group: the process group the operations use.

    Returns:
        name -> ``{"median": s, "min": s, "max": s, "samples": [s, ...]}`` of the per-iteration times in
        seconds (``samples`` in iteration order, so that ops of one iteration can be paired), identical on
        every rank.
    """
    names = list(ops)
    samples = torch.zeros(iters, len(names), dtype=torch.float64)
    for it in range(warmup + iters):
        order = list(enumerate(names))
        if it % 2:
            order.reverse()
        for j, name in order:
            _sync(device)
            dist.barrier(group=group)
            start = time.perf_counter()
            ops[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                samples[it - warmup, j] = elapsed
    gathered = samples.to(device)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX, group=group)
    gathered = gathered.cpu()
    return {
        name: {
            "median": statistics.median(gathered[:, j].tolist()),
            "min": float(gathered[:, j].min()),
            "max": float(gathered[:, j].max()),
            "samples": gathered[:, j].tolist(),
        }
        for j, name in enumerate(names)
    }
