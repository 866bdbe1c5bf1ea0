"""Schedule generators: DualPipe, DualPipeV, 1F1B and ZB1P (ZB-H1), emitted as :class:`~dualpipe.ir.Schedule`.

DualPipe and DualPipeV follow DeepSeek's ``step()`` (deepseek-ai/DualPipe) phase by phase, with the same
phase names, but emit actions instead of running them. Both are built by :func:`_dual_phase_plan` from the
same eight phases; they differ only in the stage mapping (:class:`_PhaseMap`):

* DualPipeV on R ranks: rank r holds stage r ("phase 0") and stage 2R-1-r ("phase 1") of one V-shaped chain
  of 2R stages; the phases run with (num_ranks=R, rank=r, chunks=N).
* DualPipe on R ranks (R even): it is DualPipeV on the R/2 "half ranks" for each half of the machine: rank r
  runs the phases with (num_ranks=R/2, rank=min(r, R-1-r), chunks=N/2). Phase p of rank r is chain
  ``p ^ (r >= R/2)``, whose stage on rank r is r (chain 0) or 2R-1-r (chain 1).

Phase p's micro-batches are consumed in order 0, 1, ... separately for forwards and backwards, as the
reference's ``current_f_chunk_id`` / ``current_b_chunk_id`` do. A zero-bubble backward (``enable_zb``)
is emitted as I, and its W is emitted when the reference pops the WeightGradStore queue (FIFO order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dualpipe.ir import Action, Kind, Schedule, Topology
from dualpipe.validate import check_counts

__all__ = ["SCHEDULES", "generate", "dualpipe", "dualpipev", "one_f_one_b", "zb1p"]

# Entry point: generate(name, num_ranks, num_chunks); names in SCHEDULES.
SCHEDULES: tuple[str, ...] = ("dualpipe", "dualpipev", "1f1b", "zb1p")


# ---------------------------------------------------------------------------------------------------------
# DualPipe / DualPipeV
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PhaseMap:
    """Maps a rank's two phases to global stages (the only difference between DualPipe and DualPipeV)."""

    stage_of_phase: tuple[int, int]


class _RankPlan:
    """Emits one rank's actions as the reference's ``_forward_chunk`` / ``_backward_chunk`` /
    ``_weight_chunk`` / ``_forward_backward_chunk`` calls would run them."""

    def __init__(self, phase_map: _PhaseMap) -> None:
        self.stage = phase_map.stage_of_phase
        self.next_f = [0, 0]  # current_f_chunk_id per phase
        self.next_b = [0, 0]  # current_b_chunk_id per phase
        self.weight_queue: deque[tuple[int, int]] = deque()  # WeightGradStore.funcs_queue: (stage, mb)
        self.actions: list[Action] = []

    def _take_f(self, phase: int) -> Action:
        a = Action(self.stage[phase], Kind.F, self.next_f[phase])
        self.next_f[phase] += 1
        return a

    def _take_b(self, phase: int, enable_zb: bool) -> Action:
        stage, mb = self.stage[phase], self.next_b[phase]
        self.next_b[phase] += 1
        if enable_zb:
            self.weight_queue.append((stage, mb))
            return Action(stage, Kind.I, mb)
        return Action(stage, Kind.B, mb)

    def forward_chunk(self, phase: int) -> None:
        self.actions.append(self._take_f(phase))

    def backward_chunk(self, phase: int, enable_zb: bool = False) -> None:
        self.actions.append(self._take_b(phase, enable_zb))

    def weight_chunk(self) -> None:
        stage, mb = self.weight_queue.popleft()
        self.actions.append(Action(stage, Kind.W, mb))

    def forward_backward_chunk(self, phase0: int, phase1: int) -> None:
        """Forward of ``phase0`` overlapped with a full backward of ``phase1``."""
        self.actions.append(Action.overlap(self._take_f(phase0), self._take_b(phase1, enable_zb=False)))


def _dual_phase_plan(plan: _RankPlan, num_ranks: int, rank: int, num_chunks: int) -> None:
    """DeepSeek's eight phases for one rank, in DualPipeV terms.

    Args:
        plan: receives the actions.
        num_ranks: ranks of the V (R for DualPipeV, R/2 for DualPipe).
        rank: position in the V (r for DualPipeV, min(r, R-1-r) for DualPipe).
        num_chunks: micro-batches per phase (N for DualPipeV, N/2 for DualPipe).
    """
    is_last_rank = rank == num_ranks - 1  # DualPipe's "middle rank": the bend of the V

    # Step 1: nF0
    for _ in range((num_ranks - rank - 1) * 2):
        plan.forward_chunk(0)

    # Step 2: nF0F1
    for _ in range(rank + 1):
        plan.forward_chunk(0)
        plan.forward_chunk(1)

    # Step 3: nB1W1F1 (use zero bubble)
    for _ in range(num_ranks - rank - 1):
        plan.backward_chunk(1, enable_zb=True)
        plan.weight_chunk()
        plan.forward_chunk(1)

    # Step 4 (main step): nF0B1F1B0
    for i in range(num_chunks - num_ranks * 2 + rank + 1):
        if i == 0 and is_last_rank:
            # As in the reference: at the bend these two chunks are not overlapped, to shrink the bubble.
            plan.forward_chunk(0)
            plan.backward_chunk(1)
        else:
            plan.forward_backward_chunk(0, 1)
        plan.forward_backward_chunk(1, 0)

    # Step 5: nB1F1B0
    for _ in range(num_ranks - rank - 1):
        plan.backward_chunk(1)
        plan.forward_backward_chunk(1, 0)

    # Step 6: nB1B0 (the second half of the chunks use zero bubble)
    step_6 = rank + 1
    enable_zb = False
    for i in range(step_6):
        if i == step_6 // 2 and rank % 2 == 1:
            enable_zb = True
        plan.backward_chunk(1, enable_zb=enable_zb)
        if i == step_6 // 2 and rank % 2 == 0:
            enable_zb = True
        plan.backward_chunk(0, enable_zb=enable_zb)

    # Step 7: nWB0 (use zero bubble)
    for _ in range(num_ranks - rank - 1):
        plan.weight_chunk()
        plan.backward_chunk(0, enable_zb=True)

    # Step 8: nW
    for _ in range(rank + 1):
        plan.weight_chunk()

    assert not plan.weight_queue, "WeightGradStore queue not drained"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV ("cut in half"): one V-shaped chain of 2R stages on R ranks.

    Args:
        num_ranks: R >= 1 pipeline ranks; rank r holds stages r and 2R-1-r.
        num_chunks: N micro-batches, N >= 2R.

    Returns:
        The schedule over :meth:`Topology.v_shape` (rank 0 takes the inputs and computes the loss).
    """
    _check_positive("num_ranks", num_ranks)
    _check_positive("num_chunks", num_chunks)
    if num_chunks < 2 * num_ranks:
        raise ValueError(
            f"dualpipev needs num_chunks >= 2 * num_ranks, got num_chunks={num_chunks}, num_ranks={num_ranks}: "
            f"use at least {2 * num_ranks} chunks or fewer ranks"
        )
    topo = Topology.v_shape(num_ranks, num_chunks)
    rows = []
    for r in range(num_ranks):
        plan = _RankPlan(_PhaseMap((r, 2 * num_ranks - 1 - r)))
        _dual_phase_plan(plan, num_ranks, r, num_chunks)
        rows.append(tuple(plan.actions))
    return check_counts(Schedule("dualpipev", topo, tuple(rows)))


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe: two chains of R stages in opposite directions on R ranks (2x parameters per rank).

    Args:
        num_ranks: R, even. Rank r holds stage r of chain 0 (fed by rank 0) and stage 2R-1-r of chain 1
            (fed by rank R-1).
        num_chunks: N, even and >= 2R; each chain gets N/2 micro-batches.

    Returns:
        The schedule over :meth:`Topology.dual`.
    """
    _check_positive("num_ranks", num_ranks)
    _check_positive("num_chunks", num_chunks)
    if num_ranks % 2:
        raise ValueError(
            f"dualpipe needs an even num_ranks, got {num_ranks}: use {num_ranks + 1} ranks, or dualpipev, "
            "which takes any rank count"
        )
    if num_chunks % 2:
        raise ValueError(
            f"dualpipe needs an even num_chunks (half per direction), got {num_chunks}: use {num_chunks + 1}"
        )
    if num_chunks < 2 * num_ranks:
        raise ValueError(
            f"dualpipe needs num_chunks >= 2 * num_ranks, got num_chunks={num_chunks}, num_ranks={num_ranks}: "
            f"use at least {2 * num_ranks} chunks"
        )
    topo = Topology.dual(num_ranks, num_chunks)
    half = num_ranks // 2
    rows = []
    for r in range(num_ranks):
        in_second_half = r >= half
        own = (r, 2 * num_ranks - 1 - r)  # stage of chain 0, chain 1 on rank r
        # Phase p is chain p ^ is_in_second_half, as the reference's `phase ^= self.is_in_second_half`.
        plan = _RankPlan(_PhaseMap((own[0 ^ in_second_half], own[1 ^ in_second_half])))
        _dual_phase_plan(plan, half, min(r, num_ranks - 1 - r), num_chunks // 2)
        rows.append(tuple(plan.actions))
    return check_counts(Schedule("dualpipe", topo, tuple(rows)))


# ---------------------------------------------------------------------------------------------------------
# 1F1B and ZB1P
# ---------------------------------------------------------------------------------------------------------


def _one_f_one_b_order(num_ranks: int, num_chunks: int, rank: int) -> Iterator[tuple[Kind, int]]:
    """Rank ``rank``'s 1F1B order as ``(Kind.F or Kind.B, micro-batch)``: R-1-r warm-up forwards, then
    alternating forwards and backwards, then the remaining backwards."""
    warmup = min(num_ranks - 1 - rank, num_chunks)
    for mb in range(warmup):
        yield Kind.F, mb
    for k in range(num_chunks - warmup):
        yield Kind.F, warmup + k
        yield Kind.B, k
    for mb in range(num_chunks - warmup, num_chunks):
        yield Kind.B, mb


def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: stage s on rank s; rank r runs R-1-r warm-up forwards, then alternates F and B, then drains.

    Args:
        num_ranks: R >= 1.
        num_chunks: N >= 1 micro-batches.
    """
    _check_positive("num_ranks", num_ranks)
    _check_positive("num_chunks", num_chunks)
    rows = tuple(
        tuple(Action(r, kind, mb) for kind, mb in _one_f_one_b_order(num_ranks, num_chunks, r)) for r in range(num_ranks)
    )
    return check_counts(Schedule("1f1b", Topology.linear(num_ranks, num_chunks), rows))


def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB1P (ZB-H1, Qi et al. 2023): 1F1B with every backward split into I and W, W deferred to fill bubbles.

    Rank r runs R-1-r warm-up forwards, then alternates F and I; after each I it runs the oldest pending W
    only while more than r are pending. Rank r thus keeps r weight-grads in hand (the last rank R-1 the
    most, rank 0 none) and spends them in the cool-down, where it would otherwise wait for gradients; the
    activations in flight on rank r stay <= R (1F1B's peak on rank 0). Simulated, the step's bubble is
    (R-1)(F+B-2W) for W <= F and N >= R (see tests/test_dualpipe_simulate.py).

    Args:
        num_ranks: R >= 1.
        num_chunks: N >= 1 micro-batches.
    """
    _check_positive("num_ranks", num_ranks)
    _check_positive("num_chunks", num_chunks)
    rows = []
    for r in range(num_ranks):
        acts: list[Action] = []
        pending: deque[int] = deque()  # micro-batches whose I ran and whose W has not
        for kind, mb in _one_f_one_b_order(num_ranks, num_chunks, r):
            if kind is Kind.F:
                acts.append(Action(r, Kind.F, mb))
                continue
            acts.append(Action(r, Kind.I, mb))  # the backward's input half now, its W once more than r wait
            pending.append(mb)
            while len(pending) > r:
                acts.append(Action(r, Kind.W, pending.popleft()))
        acts += [Action(r, Kind.W, mb) for mb in pending]
        rows.append(tuple(acts))
    return check_counts(Schedule("zb1p", Topology.linear(num_ranks, num_chunks), tuple(rows)))


_GENERATORS: dict[str, Callable[[int, int], Schedule]] = {
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
}


def generate(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """Build the named schedule (one of :data:`SCHEDULES`) for ``num_ranks`` ranks and ``num_chunks`` micro-batches."""
    try:
        gen = _GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}") from None
    return gen(num_ranks, num_chunks)
