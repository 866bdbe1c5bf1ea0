"""Dry-run a schedule with per-action costs: timeline, bubbles and peak activations per rank.

Model (what it does and does not capture):

* Each rank runs its actions strictly in plan order, one at a time. An action starts when the rank is
  free and its inputs are ready; it never waits for anything else (no stream, memory or link contention).
* Dependencies of a compute action on (stage s, micro-batch mb):
    F(s, mb)   after F(prev_stage(s), mb) [+ p2p if that stage is on another rank]
    B/I(s, mb) after F(s, mb), and after B/I(next_stage(s), mb) [+ p2p if on another rank]
    W(s, mb)   after I(s, mb)
  The first stage's F needs nothing (inputs are local); the loss stage's B/I needs only its own F.
* Durations: F = ``costs.F``; B = ``costs.B``; I = ``costs.B - costs.W``; W = ``costs.W``;
  an OVERLAP_F_B pair takes ``costs.FB`` (default F + B), minus W when its backward is an I; both halves
  of a pair finish together at the pair's end.
* SEND_*/RECV_* actions of a lowered plan are ignored; transfer time is modelled by ``costs.p2p`` on
  each cross-rank edge instead. FIFO matching of messages is checked by :func:`dualpipe.validate.check_p2p_fifo`.

Bubble: ``bubble[r] = makespan - busy[r]``, the time rank r is idle between time 0 and the end of the
whole step (the last action on any rank). With uniform costs every rank of 1F1B, ZB1P, DualPipe and
DualPipeV does the same work, so the bubble is the same on every rank except where DualPipe's ranks
overlap a different number of F&B pairs. See :func:`simulate` for how the published formulas map onto it.

Activations: a forward activation of (stage, mb) is counted live from the *start* of its F until the *end*
of the action that frees it, its B (full backward) or its W (split backward; the I keeps the inputs the W
needs). Frees at time t are counted before allocations at t. ``peak_activations[r]`` is the largest number
live at once on rank r, in units of one (stage, micro-batch) activation, summed over the stages the rank
holds. An overlapped F&B pair therefore holds one more activation than its neighbours (the forward's
activation is allocated before the backward's is freed).

With that unit the activation column of the published table holds exactly (PP = stages per chain, each
stage model/PP: the rank count for 1F1B, ZB1P and DualPipe, 2 x ranks for DualPipeV): 1F1B peaks at PP on
rank 0, ZB1P at PP, DualPipe and DualPipeV at PP+1 on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, walk_ranks

__all__ = ["Costs", "Event", "SimResult", "simulate"]


@dataclass(frozen=True)
class Costs:
    """Per-chunk costs (any time unit).

    Attributes:
        F: forward of one (stage, mb).
        B: full backward (input grad + weight grad) of one (stage, mb).
        W: weight-grad part of B; a split backward runs I = B - W now and W later. 0 <= W <= B.
        FB: an overlapped forward+backward pair; None means F + B (no overlap gain).
        p2p: latency of one cross-rank activation/gradient transfer.
    """

    F: float
    B: float
    W: float = 0.0
    FB: float | None = None
    p2p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "p2p"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"Costs.W ({self.W}) is part of B and cannot exceed it ({self.B})")
        if self.FB is not None and self.FB < 0:
            raise ValueError(f"Costs.FB must be >= 0, got {self.FB}")

    @property
    def I(self) -> float:  # noqa: E743
        """Input-grad part of a split backward, B - W."""
        return self.B - self.W

    @property
    def pair(self) -> float:
        """Cost of an overlapped F&B pair (FB, or F + B when not given)."""
        return self.F + self.B if self.FB is None else self.FB

    def duration(self, action: Action) -> float:
        """Time ``action`` occupies its rank (0 for SEND/RECV)."""
        kind = action.kind
        if kind is Kind.F:
            return self.F
        if kind is Kind.B:
            return self.B
        if kind is Kind.I:
            return self.I
        if kind is Kind.W:
            return self.W
        if kind is Kind.OVERLAP_F_B:
            return self.pair - (self.W if action.sub_actions[1].kind is Kind.I else 0.0)
        return 0.0


@dataclass(frozen=True)
class Event:
    """One executed action: ``action`` ran on ``rank`` from ``start`` to ``end``."""

    rank: int
    start: float
    end: float
    action: Action


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        makespan: end of the last action on any rank (the step time).
        busy: ``[R]`` compute time per rank.
        bubble: ``[R]`` idle time per rank, ``makespan - busy[r]``.
        max_bubble: ``max(bubble)``.
        peak_activations: ``[R]`` peak live forward activations per rank (see module docstring).
        events: every compute action with its rank and times, in per-rank plan order, rank by rank.
    """

    makespan: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    max_bubble: float
    peak_activations: tuple[int, ...]
    events: tuple[Event, ...]


def _deps(schedule: Schedule, act: Action, p2p: float) -> list[tuple[tuple[str, int, int], float]]:
    """(key, extra delay) pairs that ``act`` (a plain compute action) waits for.

    Keys: ("F", s, mb) end of a forward; ("G", s, mb) end of B or I (the input grad exists); ("I", s, mb).
    """
    topo = schedule.topology
    s, mb = act.stage, act.microbatch
    assert mb is not None
    me = topo.rank_of(s)
    if act.kind is Kind.F:
        prev = topo.prev_stage(s)
        return [] if prev is None else [(("F", prev, mb), p2p if topo.rank_of(prev) != me else 0.0)]
    if act.kind in (Kind.B, Kind.I):
        nxt = topo.next_stage(s)
        deps = [(("F", s, mb), 0.0)]
        if nxt is not None:
            deps.append((("G", nxt, mb), p2p if topo.rank_of(nxt) != me else 0.0))
        return deps
    if act.kind is Kind.W:
        return [(("I", s, mb), 0.0)]
    return []


def _done_keys(act: Action) -> list[tuple[str, int, int]]:
    assert act.microbatch is not None
    s, mb = act.stage, act.microbatch
    if act.kind is Kind.F:
        return [("F", s, mb)]
    if act.kind is Kind.B:
        return [("G", s, mb)]
    if act.kind is Kind.I:
        return [("G", s, mb), ("I", s, mb)]
    return [("W", s, mb)]


def _describe(key: tuple[str, int, int]) -> str:
    what = {"F": "F", "G": "B/I", "I": "I", "W": "W"}[key[0]]
    return f"{key[1]}{what}{key[2]}"


def _duration(act: Action, costs: Costs, stage_costs: Mapping[int, Costs]) -> float:
    """Duration of ``act`` with per-stage overrides; a pair costs its forward stage's FB when that is set,
    else its forward's F plus its backward's B (or I)."""
    if not stage_costs:
        return costs.duration(act)
    if act.kind is Kind.OVERLAP_F_B:
        fwd, bwd = act.sub_actions
        cf, cb = stage_costs.get(fwd.stage, costs), stage_costs.get(bwd.stage, costs)
        if cf.FB is not None:
            return cf.FB - (cb.W if bwd.kind is Kind.I else 0.0)
        return cf.F + cb.duration(bwd)
    return stage_costs.get(act.stage, costs).duration(act)


def simulate(schedule: Schedule, costs: Costs, *, stage_costs: Mapping[int, Costs] | None = None) -> SimResult:
    """Run ``schedule`` under ``costs`` and measure it.

    Args:
        schedule: a compute plan (lowered plans are accepted; their SEND/RECV are skipped).
        costs: per-chunk costs, for every stage not in ``stage_costs``; ``costs.p2p`` is used for all edges.
        stage_costs: optional per-stage overrides (e.g. a heavier loss stage), keyed by global stage id.
            An OVERLAP_F_B pair costs its forward stage's ``FB`` when set (minus the backward's W when it
            is an I), otherwise the forward's F plus the backward's own duration.

    Returns:
        :class:`SimResult`. The published bubble formulas (REFERENCE.md section 4) are ``max_bubble``,
        the worst rank's idle time ``makespan - busy[r]``, with PP the stages per chain (ranks for 1F1B,
        ZB1P and DualPipe; 2 x ranks for DualPipeV, which runs PP stages on PP/2 devices):

        * 1F1B: (PP-1)(F+B), for any costs;
        * ZB1P: (PP-1)(F+B-2W), for W <= F (the zero-bubble paper's regime);
        * DualPipe, DualPipeV: (PP/2-1)(F&B+B-3W) exactly when F = W = B/2, for any F&B (e.g. DualPipe on
          8 ranks with F=1, B=2, W=1, F&B=3: 6); smaller when W < F.

        ``tests/test_dualpipe_simulate.py`` pins all of these.

    Raises:
        ScheduleError: on a deadlock (an action whose input is never produced before it in any order the
            ranks can run), with the grid marking the first stuck action of the first stuck rank.
    """
    topo = schedule.topology
    rows = [[a for a in row if a.kind.is_compute] for row in schedule.ranks]
    # Map filtered positions back to the plan's own step numbers for error marks.
    positions = [[i for i, a in enumerate(row) if a.kind.is_compute] for row in schedule.ranks]
    num_ranks = topo.num_ranks
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * num_ranks
    per_rank_events: list[list[Event]] = [[] for _ in range(num_ranks)]

    def advance(r: int, _step: int, act: Action) -> bool:
        ready = free[r]
        for sub in act.computes():
            for key, delay in _deps(schedule, sub, costs.p2p):
                if key not in done:
                    return False
                ready = max(ready, done[key] + delay)
        end = ready + _duration(act, costs, stage_costs or {})
        for sub in act.computes():
            for key in _done_keys(sub):
                done[key] = end
        per_rank_events[r].append(Event(r, ready, end, act))
        free[r] = end
        return True

    ptr = walk_ranks(rows, advance)
    stuck = [r for r in range(num_ranks) if ptr[r] < len(rows[r])]
    if stuck:
        waits = []
        for r in stuck:
            act = rows[r][ptr[r]]
            missing = [_describe(k) for sub in act.computes() for k, _ in _deps(schedule, sub, 0.0) if k not in done]
            waits.append(f"rank {r} at {act} waits for {', '.join(missing)}")
        r0 = stuck[0]
        raise ScheduleError("deadlock: no rank can proceed; " + "; ".join(waits), schedule, (r0, positions[r0][ptr[r0]]))

    makespan = max((e.end for evs in per_rank_events for e in evs), default=0.0)
    busy = tuple(sum(e.end - e.start for e in evs) for evs in per_rank_events)
    bubble = tuple(makespan - b for b in busy)
    peaks = tuple(_peak_activations(evs) for evs in per_rank_events)
    return SimResult(
        makespan=makespan,
        busy=busy,
        bubble=bubble,
        max_bubble=max(bubble, default=0.0),
        peak_activations=peaks,
        events=tuple(e for evs in per_rank_events for e in evs),
    )


def _peak_activations(events: list[Event]) -> int:
    """Peak live activations on one rank: +1 at an F's start, -1 at the end of its B or W."""
    deltas: list[tuple[float, int]] = []
    for e in events:
        for sub in e.action.computes():
            if sub.kind is Kind.F:
                deltas.append((e.start, +1))
            elif sub.kind in (Kind.B, Kind.W):
                deltas.append((e.end, -1))
    live = peak = 0
    for _, d in sorted(deltas):  # -1 sorts before +1 at equal times: frees first
        live += d
        peak = max(peak, live)
    return peak
