"""``all_to_all_single`` with ``torch.distributed``'s signature, through the runtime's bounded collectives.

Differences from ``torch.distributed.all_to_all_single``: every wait is bounded by the runtime timeout
(``MOE_COMM_TIMEOUT_S``, raising :class:`moe_comm.CommTimeoutError` naming the rank instead of hanging),
and any dtype moves on any backend (tensors travel as bytes, so float8, bool and complex work on gloo).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe_comm.collectives import StepContext, all_to_all_rows, wait_all
from moe_comm.env import settings

__all__ = ["all_to_all_single"]


class _Work:
    """What ``async_op=True`` returns: ``wait()`` (bounded), ``is_completed()``."""

    def __init__(self, ctx: StepContext, work: dist.Work | None, finish: list) -> None:
        self._ctx = ctx
        self._work = work
        self._finish = finish
        self._done = False

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if not self._done:
            if timeout is not None:
                self._ctx.timeout_s = timeout.total_seconds()
            wait_all(self._ctx, [self._work], "all_to_all_single", host_visible=False)
            for fn in self._finish:
                fn()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()

    def is_success(self) -> bool:
        return self.is_completed()


def _rows(splits: Sequence[int] | None, n: int, world: int, name: str) -> list[int] | None:
    if splits is None or len(splits) == 0:
        if n % world:
            raise ValueError(f"{name}: dim 0 ({n}) is not divisible by the group size {world}; pass split sizes")
        return None
    splits = [int(s) for s in splits]
    if len(splits) != world or sum(splits) != n or min(splits) < 0:
        raise ValueError(f"{name}: expected {world} non-negative sizes summing to dim 0 = {n}, got {splits}")
    return splits


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
    *,
    timeout_s: float | None = None,
) -> _Work | None:
    """Split ``input`` along dim 0, send split ``i`` to rank ``i``, and gather what each rank sends into ``output``.

    Args:
        output: ``[sum(output_split_sizes), ...]`` tensor to fill (same trailing shape and dtype as ``input``).
        input: ``[sum(input_split_sizes), ...]`` tensor of any dtype.
        output_split_sizes / input_split_sizes: rows from / to each rank; ``None`` or empty = equal splits.
        group: process group (default: the world).
        async_op: return a work object to ``wait()`` on instead of completing now.
        timeout_s: bound on the wait (default ``MOE_COMM_TIMEOUT_S``, 120 s); past it
            :class:`moe_comm.CommTimeoutError` is raised naming this rank.

    Returns:
        A work object with ``wait()`` when ``async_op``, else ``None``.
    """
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if output.dtype != input.dtype or output.shape[1:] != input.shape[1:]:
        raise ValueError(f"output: expected dtype {input.dtype} and trailing shape {tuple(input.shape[1:])}, got {output.dtype} {tuple(output.shape[1:])}")
    out_rows = _rows(output_split_sizes, output.shape[0], world, "output_split_sizes")
    in_rows = _rows(input_split_sizes, input.shape[0], world, "input_split_sizes")
    ctx = StepContext(group, dist.get_rank(group), "all_to_all_single", float(timeout_s if timeout_s is not None else settings().timeout_s))
    src = input.contiguous()
    if src.dim() == 1:
        src = src.unsqueeze(1)
    finish = []
    dst = output if output.is_contiguous() else torch.empty_like(output, memory_format=torch.contiguous_format)
    if dst is not output:
        finish.append(lambda: output.copy_(dst))
    dst2 = dst.unsqueeze(1) if dst.dim() == 1 else dst
    if src.is_complex():
        src, dst2 = torch.view_as_real(src), torch.view_as_real(dst2)
    work = all_to_all_rows(ctx, dst2, src, out_rows, in_rows)
    handle = _Work(ctx, work, finish)
    if async_op:
        return handle
    handle.wait()
    return None
