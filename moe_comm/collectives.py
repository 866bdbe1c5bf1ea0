"""Bounded ``torch.distributed`` collectives that move tensors of any dtype as raw bytes.

Every wait here is bounded: on gloo by ``Work.wait(timeout)``, on NCCL by polling ``is_completed``
against a deadline for host-visible results (and by the process group's own timeout for the rest).
A timeout raises :class:`moe_comm.errors.CommTimeoutError` naming the rank, the operation and the step.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe_comm.errors import CommTimeoutError

__all__ = ["StepContext", "all_gather_rows", "all_to_all_rows", "as_bytes", "wait_all"]


class StepContext:
    """Names the rank, operation and timeout for the error raised when a wait expires."""

    __slots__ = ("group", "rank", "op", "timeout_s", "is_nccl")

    def __init__(self, group: dist.ProcessGroup, rank: int, op: str, timeout_s: float) -> None:
        self.group = group
        self.rank = rank
        self.op = op
        self.timeout_s = timeout_s
        self.is_nccl = dist.get_backend(group) == "nccl"

    def timeout_error(self, step: str, detail: str = "") -> CommTimeoutError:
        return CommTimeoutError(self.rank, self.op, step, self.timeout_s, detail)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View a contiguous ``[N, ...]`` tensor as ``[N, row_bytes]`` uint8 (gloo lacks float8 and some dtypes)."""
    row = 1
    for size in t.shape[1:]:
        row *= size
    flat = t.reshape(t.shape[0], row)
    return flat if t.dtype == torch.uint8 else flat.view(torch.uint8)


def wait_all(ctx: StepContext, works: Sequence[dist.Work | None], step: str, host_visible: bool = True) -> None:
    """Wait for ``works`` within ``ctx.timeout_s``.

    Args:
        ctx: who is waiting, for the error message.
        works: the pending collectives (``None`` entries are skipped).
        step: what is being waited for, e.g. ``"payload all_to_all"``.
        host_visible: on NCCL, whether the host needs the results now (then it polls until done);
            otherwise the current stream is made to wait and the host returns at once.
    """
    deadline = time.monotonic() + ctx.timeout_s
    for work in works:
        if work is None:
            continue
        if ctx.is_nccl:
            if host_visible:
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise ctx.timeout_error(step)
                    time.sleep(20e-6)
            work.wait()
            continue
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=datetime.timedelta(seconds=remaining))
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise ctx.timeout_error(step) from exc
            raise


def all_to_all_rows(
    ctx: StepContext,
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_rows: Sequence[int] | None,
    input_split_rows: Sequence[int] | None,
) -> dist.Work | None:
    """Start an ``all_to_all_single`` of rows (split sizes in rows, ``None`` = equal splits) as bytes.

    Returns the pending work (wait for it with :func:`wait_all`), or ``None`` for a world of one,
    where the copy is done at once.
    """
    if dist.get_world_size(ctx.group) == 1:
        output.copy_(input)
        return None
    out_b, in_b = as_bytes(output), as_bytes(input)
    return dist.all_to_all_single(
        out_b,
        in_b,
        None if output_split_rows is None else list(output_split_rows),
        None if input_split_rows is None else list(input_split_rows),
        group=ctx.group,
        async_op=True,
    )


def all_gather_rows(ctx: StepContext, output: torch.Tensor, input: torch.Tensor) -> dist.Work | None:
    """Start an ``all_gather_into_tensor`` of ``input [n, ...]`` into ``output [R * n, ...]`` as bytes."""
    world = dist.get_world_size(ctx.group)
    if world == 1:
        output.copy_(input)
        return None
    if not ctx.is_nccl:
        # gloo's all-gather is a ring of R - 1 dependent steps; its all-to-all sends to every peer at once,
        # which halves the latency of the small gathers (headers, counts) at 4 ranks.
        repeated = as_bytes(input).repeat(world, 1)
        return dist.all_to_all_single(as_bytes(output).view(world, -1), repeated.view(world, -1), group=ctx.group, async_op=True)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(as_bytes(output), as_bytes(input), group=ctx.group, async_op=True)
