"""Checks and lowering passes over :class:`~dualpipe.ir.Schedule` plans.

* :func:`check_counts`: every (stage, mb) has one F and either one B or one I and one W, on the stage's rank.
* :func:`validate`: counts, same-rank dependency order, cross-rank deadlock freedom (by simulation), and
  the p2p FIFO check of the lowered plan. Raises :class:`~dualpipe.ir.ScheduleError` with the grid.
* :func:`lower_to_p2p`: a pure pass adding SEND_F/RECV_F/SEND_B/RECV_B.
* :func:`check_p2p_fifo`: runs a lowered plan with per-peer FIFO message matching (NCCL semantics).

Message naming: ``SEND_F s mb`` sends stage s's forward output to ``next_stage(s)``; ``RECV_F s mb`` receives
stage s's forward input from ``prev_stage(s)``; ``SEND_B s mb`` sends the gradient of stage s's input to
``prev_stage(s)``; ``RECV_B s mb`` receives the gradient of stage s's output from ``next_stage(s)``
(torch.distributed.pipelining's convention). Stages on the same rank exchange nothing.
"""

from __future__ import annotations

from collections import Counter, deque

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, walk_ranks

__all__ = ["check_counts", "validate", "lower_to_p2p", "check_p2p_fifo"]


def _compute_positions(schedule: Schedule) -> dict[tuple[Kind, int, int], tuple[int, int]]:
    """(kind, stage, mb) -> (rank, step) of the first occurrence of each plain compute action."""
    pos: dict[tuple[Kind, int, int], tuple[int, int]] = {}
    for r, row in enumerate(schedule.ranks):
        for i, a in enumerate(row):
            if a.kind.is_compute:
                for sub in a.computes():
                    assert sub.microbatch is not None
                    pos.setdefault((sub.kind, sub.stage, sub.microbatch), (r, i))
    return pos


def check_counts(schedule: Schedule) -> Schedule:
    """Check placement and F/B/I/W counts; return ``schedule`` unchanged.

    Every action's stage exists and lives on the rank that runs it, its micro-batch is within its chain's
    count, and every (stage, mb) has exactly one F and either exactly one B, or exactly one I and one W.

    Raises:
        ScheduleError: naming the first offending (stage, mb), with the grid marked there.
    """
    topo = schedule.topology
    counts: Counter[tuple[Kind, int, int]] = Counter()
    for r, row in enumerate(schedule.ranks):
        for i, a in enumerate(row):
            if not a.kind.is_compute:
                continue
            for sub in a.computes():
                assert sub.microbatch is not None
                if not 0 <= sub.stage < topo.num_stages:
                    raise ScheduleError(f"{sub}: stage {sub.stage} does not exist", schedule, (r, i))
                if topo.rank_of(sub.stage) != r:
                    raise ScheduleError(
                        f"{sub}: stage {sub.stage} lives on rank {topo.rank_of(sub.stage)}, not rank {r}",
                        schedule,
                        (r, i),
                    )
                if sub.microbatch >= topo.num_microbatches(sub.stage):
                    raise ScheduleError(
                        f"{sub}: micro-batch {sub.microbatch} >= {topo.num_microbatches(sub.stage)} of its chain",
                        schedule,
                        (r, i),
                    )
                counts[(sub.kind, sub.stage, sub.microbatch)] += 1
    pos = _compute_positions(schedule)
    for s in range(topo.num_stages):
        for mb in range(topo.num_microbatches(s)):
            f, b, i_, w = (counts[(k, s, mb)] for k in (Kind.F, Kind.B, Kind.I, Kind.W))
            ok = f == 1 and ((b == 1 and i_ == 0 and w == 0) or (b == 0 and i_ == 1 and w == 1))
            if not ok:
                where = next((pos[(k, s, mb)] for k in (Kind.F, Kind.B, Kind.I, Kind.W) if (k, s, mb) in pos), None)
                raise ScheduleError(
                    f"stage {s} micro-batch {mb}: {f} F, {b} B, {i_} I, {w} W; need 1 F and (1 B or 1 I + 1 W)",
                    schedule,
                    where,
                )
    return schedule


def _check_local_order(schedule: Schedule) -> None:
    """Same-rank dependencies must come strictly earlier in the rank's plan (an overlap pair is one step)."""
    topo = schedule.topology
    for r, row in enumerate(schedule.ranks):
        seen: set[tuple[Kind, int, int]] = set()
        for i, a in enumerate(row):
            if not a.kind.is_compute:
                continue
            for sub in a.computes():
                s, mb = sub.stage, sub.microbatch
                assert mb is not None
                need: list[tuple[tuple[Kind, ...], int]] = []
                if sub.kind is Kind.F:
                    prev = topo.prev_stage(s)
                    if prev is not None and topo.rank_of(prev) == r:
                        need.append(((Kind.F,), prev))
                elif sub.kind in (Kind.B, Kind.I):
                    need.append(((Kind.F,), s))
                    nxt = topo.next_stage(s)
                    if nxt is not None and topo.rank_of(nxt) == r:
                        need.append(((Kind.B, Kind.I), nxt))
                elif sub.kind is Kind.W:
                    need.append(((Kind.I,), s))
                for kinds, stage in need:
                    if not any((k, stage, mb) in seen for k in kinds):
                        want = "/".join(f"{stage}{k.value}{mb}" for k in kinds)
                        raise ScheduleError(f"rank {r} runs {sub} before {want}, which it needs", schedule, (r, i))
            for sub in a.computes():
                assert sub.microbatch is not None
                seen.add((sub.kind, sub.stage, sub.microbatch))


def validate(schedule: Schedule) -> None:
    """Check ``schedule`` completely; return None or raise.

    Checks, in order: :func:`check_counts`; same-rank dependency order (F before its B/I, I before its W,
    a stage's F after the previous stage's F and its B/I after the next stage's B/I when those stages share
    the rank); cross-rank ordering by simulation (a cycle of waits is a deadlock); and the lowered plan's
    per-peer FIFO matching (:func:`check_p2p_fifo`): of ``schedule`` itself when it already holds SEND/RECV
    actions, else of :func:`lower_to_p2p` of it.

    Raises:
        ScheduleError: with the rank x step grid and the failing step marked.
    """
    from dualpipe.simulate import Costs, simulate  # local: simulate imports nothing from here

    compute = _strip_p2p(schedule)
    check_counts(compute)
    _check_local_order(compute)
    simulate(compute, Costs(F=1.0, B=2.0, W=1.0))
    # A lowered plan is checked as given; a compute plan through the lowering the runtime would use.
    check_p2p_fifo(schedule if compute is not schedule else lower_to_p2p(compute))


def _strip_p2p(schedule: Schedule) -> Schedule:
    if all(a.kind.is_compute for row in schedule.ranks for a in row):
        return schedule
    rows = tuple(tuple(a for a in row if a.kind.is_compute) for row in schedule.ranks)
    return Schedule(schedule.name, schedule.topology, rows)


# A message is named by what it carries: ("F" or "B", producing stage, mb).
_Msg = tuple[str, int, int]


def _transfers(schedule: Schedule, sub: Action, *, send: bool) -> list[tuple[Action, int, _Msg]]:
    """What compute action ``sub`` must send (``send=True``: ``(SEND action, destination rank, message)``) or
    receive (``send=False``: ``(RECV action, source rank, message)``); empty when that peer stage is local.

    An F receives from the previous stage and sends to the next; a B or I the other way round. The message
    is named by its producer: this stage for a send, the peer stage for a receive.
    """
    if sub.kind is Kind.F:
        direction, kind = "F", Kind.SEND_F if send else Kind.RECV_F
    elif sub.kind in (Kind.B, Kind.I):
        direction, kind = "B", Kind.SEND_B if send else Kind.RECV_B
    else:
        return []
    topo = schedule.topology
    s, mb = sub.stage, sub.microbatch
    assert mb is not None
    downstream = (direction == "F") == send
    peer = topo.next_stage(s) if downstream else topo.prev_stage(s)
    if peer is None or topo.rank_of(peer) == topo.rank_of(s):
        return []
    return [(Action(s, kind, mb), topo.rank_of(peer), (direction, s if send else peer, mb))]


def _message_of(schedule: Schedule, a: Action) -> tuple[int, _Msg]:
    """(peer rank, message) of a SEND/RECV action."""
    topo = schedule.topology
    s, mb = a.stage, a.microbatch
    assert mb is not None
    if a.kind is Kind.SEND_F:
        peer = topo.next_stage(s)
        msg: _Msg = ("F", s, mb)
    elif a.kind is Kind.SEND_B:
        peer = topo.prev_stage(s)
        msg = ("B", s, mb)
    elif a.kind is Kind.RECV_F:
        peer = topo.prev_stage(s)
        msg = ("F", peer, mb) if peer is not None else ("F", -1, mb)
    else:
        peer = topo.next_stage(s)
        msg = ("B", peer, mb) if peer is not None else ("B", -1, mb)
    if peer is None:
        raise ValueError(f"{a}: stage {s} has no peer stage in that direction")
    return topo.rank_of(peer), msg


def lower_to_p2p(schedule: Schedule) -> Schedule:
    """Insert the SEND/RECV actions a multi-rank run needs (pure: returns a new plan).

    Each SEND goes right after the compute that produces its tensor. Each RECV goes right before the
    compute that consumes it, except where per-peer FIFO order forces it earlier: NCCL matches the k-th
    send from a to b with the k-th recv on b from a (no tags), so the recvs on b from a are posted in the
    order a sends them; a recv whose tensor is consumed after a later-sent one is hoisted to just before the
    first of those later consumers. RECVs posted at the same step keep per-peer send order.

    Args:
        schedule: a compute-only plan (run :func:`check_counts` first).

    Returns:
        A plan with the same name and topology; the same compute actions in the same order per rank.
    """
    topo = schedule.topology
    num_ranks = topo.num_ranks
    sends_after: list[list[list[Action]]] = [[[] for _ in row] for row in schedule.ranks]
    send_order: dict[tuple[int, int], list[_Msg]] = {}  # (src, dst) -> messages in send order
    consume_at: dict[tuple[int, _Msg], tuple[int, int]] = {}  # (dst, msg) -> (step, sub-order) on dst
    recv_action: dict[tuple[int, _Msg], Action] = {}
    for r, row in enumerate(schedule.ranks):
        for i, a in enumerate(row):
            order = 0
            for sub in a.computes():
                for recv, _src, msg in _transfers(schedule, sub, send=False):
                    consume_at[(r, msg)] = (i, order)
                    recv_action[(r, msg)] = recv
                    order += 1
            for sub in a.computes():
                for send, dst, msg in _transfers(schedule, sub, send=True):
                    sends_after[r][i].append(send)
                    send_order.setdefault((r, dst), []).append(msg)

    # recvs_before[r][i]: (sort key, RECV) to insert before step i on rank r.
    recvs_before: list[list[list[tuple[tuple[int, int, int, int], Action]]]] = [
        [[] for _ in row] for row in schedule.ranks
    ]
    for (src, dst), msgs in send_order.items():
        # Walk backwards keeping the suffix minimum of consume positions.
        latest: tuple[int, int] | None = None
        placed: list[tuple[tuple[int, int], _Msg]] = []
        for msg in reversed(msgs):
            if (dst, msg) not in consume_at:
                raise ScheduleError(f"rank {src} sends {msg} to rank {dst}, which never consumes it", schedule)
            pos = consume_at[(dst, msg)]
            latest = pos if latest is None or pos < latest else latest
            placed.append((latest, msg))
        for j, (pos, msg) in enumerate(reversed(placed)):
            recvs_before[dst][pos[0]].append(((pos[0], pos[1], src, j), recv_action[(dst, msg)]))
    rows: list[tuple[Action, ...]] = []
    for r, row in enumerate(schedule.ranks):
        out: list[Action] = []
        for i, a in enumerate(row):
            out += [act for _, act in sorted(recvs_before[r][i], key=lambda t: t[0])]
            out.append(a)
            out += sends_after[r][i]
        rows.append(tuple(out))
    assert num_ranks == len(rows)
    return Schedule(schedule.name, topo, tuple(rows))


def _check_p2p_action(lowered: Schedule, a: Action, rank: int, step: int) -> None:
    """A SEND/RECV must name a stage of this rank that has a peer in that direction."""
    topo = lowered.topology
    assert a.microbatch is not None
    if not 0 <= a.stage < topo.num_stages or topo.rank_of(a.stage) != rank:
        raise ScheduleError(f"{a}: stage {a.stage} is not on rank {rank}", lowered, (rank, step))
    if a.microbatch >= topo.num_microbatches(a.stage):
        raise ScheduleError(f"{a}: micro-batch {a.microbatch} is out of range", lowered, (rank, step))
    try:
        _message_of(lowered, a)
    except ValueError as e:
        raise ScheduleError(str(e), lowered, (rank, step)) from None


def check_p2p_fifo(lowered: Schedule) -> None:
    """Run a lowered plan with NCCL-like p2p semantics and report mismatches and deadlocks.

    Model: sends are non-blocking (queued on the (src, dst) channel); a RECV blocks until its channel from
    the peer is non-empty, then takes the oldest message, which must be the one it expects (same kind,
    stage and micro-batch) or tensors would silently swap. Every compute action whose input lives on another
    rank must have received it earlier; every SEND must follow the compute that produces it. Compute
    actions take no time.

    Raises:
        ScheduleError: on a FIFO mismatch, a missing/misplaced RECV or SEND, a message never received, or a
            deadlock (every unfinished rank blocked in a RECV), with the grid marked at the offending step.
    """
    num_ranks = lowered.topology.num_ranks
    channels: dict[tuple[int, int], deque[tuple[_Msg, int, int]]] = {}
    received: list[set[_Msg]] = [set() for _ in range(num_ranks)]
    produced: list[set[tuple[Kind, int, int]]] = [set() for _ in range(num_ranks)]
    rows = lowered.ranks

    def advance(r: int, i: int, a: Action) -> bool:
        if not a.kind.is_compute:
            _check_p2p_action(lowered, a, r, i)
        if a.kind is Kind.SEND_F or a.kind is Kind.SEND_B:
            dst, msg = _message_of(lowered, a)
            need = (Kind.F,) if a.kind is Kind.SEND_F else (Kind.B, Kind.I)
            assert a.microbatch is not None
            if not any((k, a.stage, a.microbatch) in produced[r] for k in need):
                raise ScheduleError(f"rank {r} sends {a} before computing it", lowered, (r, i))
            channels.setdefault((r, dst), deque()).append((msg, r, i))
        elif a.kind is Kind.RECV_F or a.kind is Kind.RECV_B:
            src, msg = _message_of(lowered, a)
            chan = channels.get((src, r))
            if not chan:
                return False  # blocked until the peer sends
            got, sr, si = chan.popleft()
            if got != msg:
                raise ScheduleError(
                    f"p2p FIFO mismatch: rank {r} posts {a} expecting {msg[0]} of stage {msg[1]} mb {msg[2]} "
                    f"from rank {src}, but the oldest unmatched message from rank {src} is "
                    f"{got[0]} of stage {got[1]} mb {got[2]} (sent at rank {sr} step {si})",
                    lowered,
                    (r, i),
                )
            received[r].add(msg)
        else:
            for sub in a.computes():
                for _, src, msg in _transfers(lowered, sub, send=False):
                    if msg not in received[r]:
                        raise ScheduleError(f"rank {r} runs {sub} before receiving its input from rank {src}", lowered, (r, i))
                assert sub.microbatch is not None
                produced[r].add((sub.kind, sub.stage, sub.microbatch))
        return True

    ptr = walk_ranks(rows, advance)
    stuck = [r for r in range(num_ranks) if ptr[r] < len(rows[r])]
    if stuck:
        desc = "; ".join(f"rank {r} blocked at {rows[r][ptr[r]]}" for r in stuck)
        raise ScheduleError(f"p2p deadlock: {desc}", lowered, (stuck[0], ptr[stuck[0]]))
    for (src, dst), chan in channels.items():
        if chan:
            msg, sr, si = chan[0]
            raise ScheduleError(
                f"rank {src} sends {msg[0]} of stage {msg[1]} mb {msg[2]} to rank {dst}, which never receives it",
                lowered,
                (sr, si),
            )
