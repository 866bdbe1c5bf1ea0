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
        name -> ``{"median": s, "min": s, "max": s, "samples": [s, ...], "cpu_median": s}``: the
        per-iteration times in seconds (``samples`` in iteration order, so that ops of one iteration can be
        paired) and the CPU time one run costs a rank (its process, transport threads included: the
        median over iterations, averaged over ranks). Identical on every rank.
    """
    names = list(ops)
    samples = torch.zeros(iters, len(names), dtype=torch.float64)
    cpu = torch.zeros(iters, len(names), dtype=torch.float64)
    for it in range(warmup + iters):
        order = list(enumerate(names))
        if it % 2:
            order.reverse()
        for j, name in order:
            _sync(device)
            dist.barrier(group=group)
            start, start_cpu = time.perf_counter(), time.process_time()
            ops[name]()
            _sync(device)
            elapsed, spent = time.perf_counter() - start, time.process_time() - start_cpu
            if it >= warmup:
                samples[it - warmup, j] = elapsed
                cpu[it - warmup, j] = spent
    gathered = samples.to(device)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX, group=group)
    gathered = gathered.cpu()
    cpu_per_rank = cpu.quantile(0.5, dim=0).to(device)
    dist.all_reduce(cpu_per_rank, group=group)
    cpu_mean = (cpu_per_rank.cpu() / dist.get_world_size(group)).tolist()
    return {
        name: {
            "median": statistics.median(gathered[:, j].tolist()),
            "min": float(gathered[:, j].min()),
            "max": float(gathered[:, j].max()),
            "samples": gathered[:, j].tolist(),
            "cpu_median": cpu_mean[j],
        }
        for j, name in enumerate(names)
    }
