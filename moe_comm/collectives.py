"""Bounded ``torch.distributed`` collectives that move tensors of any dtype as raw bytes.

Every wait here is bounded: on gloo by ``Work.wait(timeout)``, on NCCL by polling ``is_completed``
against a deadline for host-visible results (and by the process group's own timeout for the rest).
A timeout raises :class:`moe_comm.errors.CommTimeoutError` naming the rank, the operation and the step.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe_comm.errors import CommTimeoutError

__all__ = ["PeerExchange", "StepContext", "all_gather_rows", "all_to_all_rows", "as_bytes", "wait_all"]


# Longest spin of a ``spin=True`` wait before it sleeps: a few small-message round trips on a loaded host.
_SPIN_S = 3e-3


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


def wait_all(
    ctx: StepContext, works: Sequence[dist.Work | None], step: str, host_visible: bool = True, spin: bool = False
) -> None:
    """Wait for ``works`` within ``ctx.timeout_s``.

    Args:
        ctx: who is waiting, for the error message.
        works: the pending collectives (``None`` entries are skipped).
        step: what is being waited for, e.g. ``"payload all_to_all"``.
        host_visible: on NCCL, whether the host needs the results now (then it polls until done);
            otherwise the current stream is made to wait and the host returns at once.
        spin: on gloo, poll the work and yield the CPU between polls instead of sleeping until the
            transport thread wakes this one. For small collectives (headers, counts) only: it saves a
            scheduler wake-up (1-2 ms when ranks share cores) but burns CPU during a long transfer.
            Spins at most ``_SPIN_S``, then sleeps as usual.
            Collectives only: a gloo point-to-point work reports completion only once waited on.
    """
    deadline = time.monotonic() + ctx.timeout_s
    for work in works:
        if work is None:
            continue
        if spin and not ctx.is_nccl:
            # Spin only briefly: a peer still computing must not have its cores taken by a waiting rank.
            spin_until = min(time.monotonic() + _SPIN_S, deadline)
            while not work.is_completed() and time.monotonic() < spin_until:
                os.sched_yield()
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


class PeerExchange:
    """The point-to-point messages of one operation: per peer, any number of tensors each way.

    Unlike ``all_to_all_single``, every message has its own source and destination tensor, so a receive
    lands directly in (a slice of) the final output and a send goes out as soon as its rows are staged,
    while the rows of the next peer are still being gathered. Messages between two ranks match in the
    order they are posted, per ``channel``: both sides must post the same channels in the same order
    with the same sizes (every caller derives them from counts all ranks agreed on).

    On gloo each message is posted at once (the transport thread moves it while this thread goes on);
    on NCCL the messages are queued and :meth:`start` issues them as one ``batch_isend_irecv`` group,
    since separately launched NCCL receives and sends on one stream could wait on each other.

    Args:
        ctx: who is exchanging, for timeout errors.
    """

    # gloo tags of the channels, away from the small tags other users of a group tend to pick.
    _TAG_BASE = 0x6D6300

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self._queued: list[dist.P2POp] = []
        self._batch: list[dist.Work] = []  # NCCL: the works of the started group, which completes as one
        self._recvs: dict[int, list[dist.Work]] = {}
        self._sends: list[dist.Work] = []

    def recv(self, tensor: torch.Tensor, peer: int, channel: int = 0) -> None:
        """Receive ``tensor`` (contiguous, any dtype) from group rank ``peer`` on ``channel``."""
        self._post(dist.irecv, as_bytes(tensor), peer, channel, self._recvs.setdefault(channel, []))

    def send(self, tensor: torch.Tensor, peer: int, channel: int = 0) -> None:
        """Send ``tensor`` (contiguous; kept alive until :meth:`wait_sends`) to ``peer`` on ``channel``."""
        self._post(dist.isend, as_bytes(tensor), peer, channel, self._sends)

    def _post(self, fn, tensor: torch.Tensor, peer: int, channel: int, works: list[dist.Work]) -> None:  # type: ignore[no-untyped-def]
        global_peer = dist.get_global_rank(self.ctx.group, peer)
        if self.ctx.is_nccl:
            self._queued.append(dist.P2POp(fn, tensor, global_peer, group=self.ctx.group))
            return
        works.append(fn(tensor, global_peer, group=self.ctx.group, tag=self._TAG_BASE + channel))

    def start(self) -> None:
        """Issue the queued NCCL messages (a no-op on gloo, where they are already in flight)."""
        if self._queued:
            self._batch.extend(dist.batch_isend_irecv(self._queued))
            self._queued = []

    def wait_recvs(self, channel: int, step: str) -> None:
        """Wait (bounded) until every receive on ``channel`` has landed."""
        wait_all(self.ctx, self._batch + self._recvs.pop(channel, []), step)

    def wait_sends(self, step: str) -> None:
        """Wait (bounded) until every send has left its tensor (then the tensors may be reused)."""
        works, self._sends = self._sends, []
        wait_all(self.ctx, self._batch + works, step)
