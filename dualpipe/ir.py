"""Pipeline schedules as data: actions, topologies and per-rank plans.

A schedule is one ordered tuple of :class:`Action` per rank. The same plan is read by the validator
(:mod:`dualpipe.validate`), the simulator (:mod:`dualpipe.simulate`), the visualizer and the runtime.

Legend:
    R   number of ranks (pipeline devices)
    S   number of stages (global stage ids 0..S-1; a rank may hold several)
    N   number of micro-batches of one chain
    mb  micro-batch id, counted per chain (0..N_c-1), so (stage, mb) names one unit of work

Action text is compatible with ``torch.distributed.pipelining``'s ``_Action``: ``"2F0"`` is the forward of
stage 2 on micro-batch 0, ``"3SEND_F1"`` sends stage 3's forward output of micro-batch 1, and an overlapped
forward/backward pair is written ``"(0F3;7B1)OVERLAP_F_B"``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Kind", "Action", "Topology", "Schedule", "ScheduleError", "walk_ranks"]


class Kind(enum.Enum):
    """What an :class:`Action` does."""

    F = "F"  # forward of one (stage, mb)
    B = "B"  # full backward (input grad and weight grad together)
    I = "I"  # noqa: E741  input-grad half of a split backward (zero-bubble); its W comes later
    W = "W"  # weight-grad half of a split backward
    OVERLAP_F_B = "OVERLAP_F_B"  # a forward and a backward of different (stage, mb) run together
    SEND_F = "SEND_F"  # send forward activations of (stage, mb) to next_stage's rank
    RECV_F = "RECV_F"  # receive forward activations of (stage, mb) from prev_stage's rank
    SEND_B = "SEND_B"  # send input gradients of (stage, mb) to prev_stage's rank
    RECV_B = "RECV_B"  # receive output gradients of (stage, mb) from next_stage's rank

    @property
    def is_compute(self) -> bool:
        """True for F, B, I, W and OVERLAP_F_B; False for the p2p kinds added by lowering."""
        return self in _COMPUTE_KINDS

    @property
    def is_backward(self) -> bool:
        """True for the kinds that consume an output gradient (B and I)."""
        return self in (Kind.B, Kind.I)


_COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W, Kind.OVERLAP_F_B})
# Longest names first so "SEND_F" is not read as stage "SEND_" kind "F".
_KIND_ALTERNATION = "|".join(
    re.escape(k.value) for k in sorted((k for k in Kind if k is not Kind.OVERLAP_F_B), key=lambda k: -len(k.value))
)
_SIMPLE_RE = re.compile(rf"^(\d+)({_KIND_ALTERNATION})(\d+)$")
_OVERLAP_RE = re.compile(r"^\((.*)\)OVERLAP_F_B$")


@dataclass(frozen=True)
class Action:
    """One step of one rank's plan.

    Attributes:
        stage: global stage id (``-1`` for an OVERLAP_F_B pair, whose stages are in ``sub_actions``).
        kind: what the step does.
        microbatch: micro-batch id within the stage's chain (``None`` for OVERLAP_F_B).
        sub_actions: for OVERLAP_F_B, ``(forward, backward)`` where forward is an F and backward a B
            (or I); empty otherwise.
    """

    stage: int
    kind: Kind
    microbatch: int | None
    sub_actions: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is Kind.OVERLAP_F_B:
            if self.stage != -1 or self.microbatch is not None:
                raise ValueError(
                    f"OVERLAP_F_B must have stage=-1 and microbatch=None, got {self.stage}, {self.microbatch}"
                )
            if len(self.sub_actions) != 2:
                raise ValueError(f"OVERLAP_F_B needs (forward, backward) sub_actions, got {self.sub_actions!r}")
            fwd, bwd = self.sub_actions
            if fwd.kind is not Kind.F or not bwd.kind.is_backward:
                raise ValueError(f"OVERLAP_F_B needs an F then a B or I, got {fwd} and {bwd}")
        else:
            if self.sub_actions:
                raise ValueError(f"only OVERLAP_F_B has sub_actions, got kind {self.kind.value}")
            if self.stage < 0 or self.microbatch is None or self.microbatch < 0:
                raise ValueError(
                    f"{self.kind.value} needs stage >= 0 and microbatch >= 0, got stage={self.stage}, "
                    f"microbatch={self.microbatch}"
                )

    @staticmethod
    def overlap(forward: Action, backward: Action) -> Action:
        """An OVERLAP_F_B pair running ``forward`` (an F) together with ``backward`` (a B or I)."""
        return Action(-1, Kind.OVERLAP_F_B, None, (forward, backward))

    def computes(self) -> tuple[Action, ...]:
        """The plain actions this step performs: ``sub_actions`` for a pair, ``(self,)`` otherwise."""
        return self.sub_actions if self.kind is Kind.OVERLAP_F_B else (self,)

    def __str__(self) -> str:
        if self.kind is Kind.OVERLAP_F_B:
            return "(" + ";".join(str(a) for a in self.sub_actions) + ")OVERLAP_F_B"
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @staticmethod
    def from_str(text: str) -> Action:
        """Parse the text written by ``str(action)``, e.g. ``"2F0"`` or ``"(0F3;7B1)OVERLAP_F_B"``.

        Raises:
            ValueError: naming ``text`` when it is not a valid action.
        """
        s = text.strip()
        m = _OVERLAP_RE.match(s)
        if m:
            parts = m.group(1).split(";")
            if len(parts) != 2:
                raise ValueError(f"invalid action {text!r}: OVERLAP_F_B needs exactly two actions '(F;B)'")
            try:
                return Action.overlap(Action.from_str(parts[0]), Action.from_str(parts[1]))
            except ValueError as e:
                raise ValueError(f"invalid action {text!r}: {e}") from None
        m = _SIMPLE_RE.match(s)
        if not m:
            raise ValueError(
                f"invalid action {text!r}: expected '<stage><kind><microbatch>' with kind in "
                f"{[k.value for k in Kind if k is not Kind.OVERLAP_F_B]}, or '(<F>;<B>)OVERLAP_F_B'"
            )
        return Action(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"


@dataclass(frozen=True)
class Topology:
    """Where stages live and how they chain into pipelines.

    Attributes:
        num_ranks: R, the number of pipeline ranks.
        stage_rank: ``[S]``, the rank holding each global stage id.
        chains: one tuple of stage ids per pipeline, in data-flow order: the first stage takes the inputs,
            the last computes the loss. Every stage is in exactly one chain.
        chain_microbatches: ``[num_chains]``, micro-batches fed through each chain.
    """

    num_ranks: int
    stage_rank: tuple[int, ...]
    chains: tuple[tuple[int, ...], ...]
    chain_microbatches: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {self.num_ranks}")
        for s, r in enumerate(self.stage_rank):
            if not 0 <= r < self.num_ranks:
                raise ValueError(f"stage {s} is on rank {r}, outside 0..{self.num_ranks - 1}")
        flat = sorted(s for c in self.chains for s in c)
        if flat != list(range(len(self.stage_rank))):
            raise ValueError(f"chains {self.chains} must cover stages 0..{len(self.stage_rank) - 1} exactly once")
        if len(self.chain_microbatches) != len(self.chains) or any(n < 1 for n in self.chain_microbatches):
            raise ValueError(f"chain_microbatches {self.chain_microbatches} needs one count >= 1 per chain")
        chain_of = {s: c for c, stages in enumerate(self.chains) for s in stages}
        object.__setattr__(self, "_chain_of", chain_of)

    # -- factories for the layouts the generators use -------------------------------------------------------

    @staticmethod
    def linear(num_ranks: int, num_microbatches: int) -> Topology:
        """1F1B / ZB1P: stage s on rank s, one chain 0..R-1."""
        return Topology(num_ranks, tuple(range(num_ranks)), (tuple(range(num_ranks)),), (num_microbatches,))

    @staticmethod
    def v_shape(num_ranks: int, num_microbatches: int) -> Topology:
        """DualPipeV: stages 0..2R-1, stage s on rank s if s < R else 2R-1-s, one chain 0..2R-1."""
        r = num_ranks
        stage_rank = tuple(s if s < r else 2 * r - 1 - s for s in range(2 * r))
        return Topology(r, stage_rank, (tuple(range(2 * r)),), (num_microbatches,))

    @staticmethod
    def dual(num_ranks: int, num_microbatches: int) -> Topology:
        """DualPipe: chain 0 = stages 0..R-1 (stage s on rank s), chain 1 = stages R..2R-1 (stage R+s on
        rank R-1-s); each chain gets ``num_microbatches // 2`` micro-batches."""
        r = num_ranks
        stage_rank = tuple(range(r)) + tuple(r - 1 - s for s in range(r))
        half = num_microbatches // 2
        return Topology(r, stage_rank, (tuple(range(r)), tuple(range(r, 2 * r))), (half, half))

    # -- queries --------------------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stage_rank)

    def rank_of(self, stage: int) -> int:
        return self.stage_rank[stage]

    def chain_of(self, stage: int) -> int:
        return self._chain_of[stage]  # type: ignore[attr-defined]

    def num_microbatches(self, stage: int) -> int:
        """Micro-batches that flow through ``stage`` (those of its chain)."""
        return self.chain_microbatches[self.chain_of(stage)]

    def next_stage(self, stage: int) -> int | None:
        """The stage fed by ``stage``'s output, or None for a chain's last (loss) stage."""
        chain = self.chains[self.chain_of(stage)]
        i = chain.index(stage)
        return chain[i + 1] if i + 1 < len(chain) else None

    def prev_stage(self, stage: int) -> int | None:
        """The stage feeding ``stage``, or None for a chain's first (input) stage."""
        chain = self.chains[self.chain_of(stage)]
        i = chain.index(stage)
        return chain[i - 1] if i > 0 else None

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_rank) if r == rank)


class ScheduleError(ValueError):
    """A schedule is inconsistent. The message ends with the rank x step grid, the failing step marked.

    Attributes:
        rank, step: the failing position (or None when the error is not tied to one step).
        grid: the formatted grid ("" when no schedule was given).
    """

    def __init__(self, message: str, schedule: Schedule | None = None, mark: tuple[int, int] | None = None) -> None:
        self.reason = message
        self.rank, self.step = mark if mark is not None else (None, None)
        self.grid = schedule.format_grid(mark) if schedule is not None else ""
        super().__init__(f"{message}\n{self.grid}" if self.grid else message)


@dataclass(frozen=True)
class Schedule:
    """A complete plan: per-rank ordered actions over a topology.

    Attributes:
        name: the generator's name ("dualpipe", "dualpipev", "1f1b", "zb1p", or anything for hand-made plans).
        topology: where the stages live.
        ranks: ``[R]`` tuples of actions, executed in order by each rank. Before lowering only compute
            actions (F, B, I, W, OVERLAP_F_B); after :func:`dualpipe.validate.lower_to_p2p` also
            SEND_*/RECV_*.
    """

    name: str
    topology: Topology
    ranks: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != self.topology.num_ranks:
            raise ValueError(f"schedule has {len(self.ranks)} rank rows, topology has {self.topology.num_ranks} ranks")

    @property
    def num_steps(self) -> int:
        """Length of the longest rank's plan."""
        return max((len(r) for r in self.ranks), default=0)

    def to_csv(self) -> str:
        """One line per rank, one action string per cell (torch.distributed.pipelining style)."""
        return "".join(",".join(str(a) for a in row) + "\n" for row in self.ranks)

    @staticmethod
    def from_csv(text: str, name: str, topology: Topology) -> Schedule:
        """Parse :meth:`to_csv` output. Empty cells are skipped; a missing trailing row is an empty rank.

        Raises:
            ValueError: for a bad cell (naming the row and text) or more rows than ranks.
        """
        lines = text.splitlines()
        while lines and not lines[-1].strip() and len(lines) > topology.num_ranks:
            lines.pop()
        if len(lines) > topology.num_ranks:
            raise ValueError(f"CSV has {len(lines)} rows but the topology has {topology.num_ranks} ranks")
        rows: list[tuple[Action, ...]] = []
        for r, line in enumerate(lines):
            cells = [c.strip() for c in line.split(",")]
            try:
                rows.append(tuple(Action.from_str(c) for c in cells if c))
            except ValueError as e:
                raise ValueError(f"CSV row {r} (rank {r}): {e}") from None
        rows += [()] * (topology.num_ranks - len(rows))
        return Schedule(name, topology, tuple(rows))

    def format_grid(self, mark: tuple[int, int] | None = None) -> str:
        """Rank x step grid: one line per step, one column per rank.

        Args:
            mark: ``(rank, step)`` to highlight; the cell is bracketed and the line ends "<-- ERROR HERE".
        """
        ranks = self.ranks
        cells = [[str(a) for a in row] for row in ranks]
        if mark is not None:
            mr, ms = mark
            if 0 <= mr < len(cells) and 0 <= ms < len(cells[mr]):
                cells[mr][ms] = f"[{cells[mr][ms]}]"
        width = max([len(c) for row in cells for c in row] + [len(f"Rank {len(ranks) - 1}")])
        step_w = len(str(max(self.num_steps - 1, 0)))
        lines = [f"{self.name}: {len(ranks)} ranks, {self.topology.num_stages} stages"]
        lines.append(" " * (step_w + 7) + "  ".join(f"Rank {r}".ljust(width) for r in range(len(ranks))).rstrip())
        n = max(self.num_steps, (mark[1] + 1) if mark is not None else 0)
        for step in range(n):
            row = "  ".join((cells[r][step] if step < len(cells[r]) else "").ljust(width) for r in range(len(ranks)))
            line = f"Step {step:0{step_w}d}: {row}".rstrip()
            if mark is not None and step == mark[1]:
                line += f"  <-- ERROR HERE (rank {mark[0]})"
            lines.append(line)
        return "\n".join(lines)


def walk_ranks(rows: Sequence[Sequence[Action]], advance: Callable[[int, int, Action], bool]) -> list[int]:
    """Walk the ranks' action lists together, as ranks that wait on each other would run them.

    Round-robin over the ranks, each rank runs its next actions in plan order, ``advance(rank, step,
    action)``, until one returns False (it must wait for another rank); the walk repeats while any rank
    moves. Used by the simulator (waiting on inputs) and the p2p FIFO check (waiting on messages).

    Returns:
        Per rank the step it stopped at: ``len(rows[r])`` for every rank when all ran, otherwise the ranks
        short of their end are stuck (a deadlock).
    """
    ptr = [0] * len(rows)
    moved = True
    while moved:
        moved = False
        for r, row in enumerate(rows):
            while ptr[r] < len(row) and advance(r, ptr[r], row[ptr[r]]):
                ptr[r] += 1
                moved = True
    return ptr
