"""CPU tests of the generators and the validator: hand-worked tables, the rank/chunk grid, failure reports."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, Topology
from dualpipe.schedules import SCHEDULES, dualpipe, dualpipev, generate, one_f_one_b, zb1p
from dualpipe.validate import check_counts, check_p2p_fifo, lower_to_p2p, validate


def rows_of(s: Schedule) -> list[list[str]]:
    return [[str(a) for a in row] for row in s.ranks]


def acts(text: str) -> tuple[Action, ...]:
    return tuple(Action.from_str(t) for t in text.split())


# ---- hand-worked tables -----------------------------------------------------------------------------------


def test_1f1b_table() -> None:
    assert rows_of(one_f_one_b(3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3".split(),
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3".split(),
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3".split(),
    ]


def test_zb1p_table() -> None:
    # Rank r keeps r weight-grads pending: rank 0 runs W right after I, rank 2 holds two back.
    assert rows_of(zb1p(3, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3".split(),
        "1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3".split(),
        "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3".split(),
    ]


def test_dualpipev_table() -> None:
    # R=2, N=4, worked from the eight phases (rank 0: r=0, rank 1: r=1 is the bend of the V).
    assert rows_of(dualpipev(2, 4)) == [
        # nF0 x2 | nF0F1 x1 | nB1W1F1 x1 | main x1 | nB1F1B0 x1 | nB1B0 x1 (zb from i=0 on B0) | nWB0 x1 | nW x1
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 (0F3;3B1)OVERLAP_F_B (3F2;0B0)OVERLAP_F_B 3B2 (3F3;0B1)OVERLAP_F_B "
        "3B3 0I2 0W2 0I3 0W3".split(),
        # nF0F1 x2 | main x2 (first F0/B1 not overlapped at the bend) | nB1B0 x2 (zb from i=1) | nW x2
        "1F0 2F0 1F1 2F1 1F2 2B0 (2F2;1B0)OVERLAP_F_B (1F3;2B1)OVERLAP_F_B (2F3;1B1)OVERLAP_F_B "
        "2B2 1B2 2I3 1I3 2W3 1W3".split(),
    ]


def test_dualpipe_table() -> None:
    # R=2 is DualPipeV on one half rank with N/2 chunks per chain; rank 1's phase 0 is chain 1.
    r0, r1 = rows_of(dualpipe(2, 4))
    # Exact table: nF0F1 x1 -> 0F0 3F0; main x(2-2+0+1)=1 at the bend -> 0F1 3B0 then (3F1;0B0);
    # nB1B0 x1 (zb switched on for B0 at i=0) -> 3B1 0I1; nW x1 -> 0W1.
    assert r0 == "0F0 3F0 0F1 3B0 (3F1;0B0)OVERLAP_F_B 3B1 0I1 0W1".split()
    assert r1 == "2F0 1F0 2F1 1B0 (1F1;2B0)OVERLAP_F_B 1B1 2I1 2W1".split()


def test_dualpipe_is_mirror_symmetric() -> None:
    """Rank R-1-r runs rank r's plan with the chains swapped (stage s <-> the mirrored stage)."""
    num_ranks = 6
    s = dualpipe(num_ranks, 16)
    topo = s.topology

    def mirror(a: Action) -> Action:
        if a.kind is Kind.OVERLAP_F_B:
            return Action.overlap(*(mirror(x) for x in a.sub_actions))
        chain = topo.chain_of(a.stage)
        other = topo.chains[1 - chain][topo.chains[chain].index(a.stage)]
        return dataclasses.replace(a, stage=other)

    for r in range(num_ranks):
        assert s.ranks[num_ranks - 1 - r] == tuple(mirror(a) for a in s.ranks[r])


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_dualpipev_phase_counts(num_ranks: int) -> None:
    n = 3 * num_ranks
    s = dualpipev(num_ranks, n)
    for r, row in enumerate(s.ranks):
        overlaps = sum(a.kind is Kind.OVERLAP_F_B for a in row)
        main = n - 2 * num_ranks + r + 1
        # main: 2 pairs per iteration (1 at the bend's first iteration); nB1F1B0: 1 pair per iteration.
        assert overlaps == 2 * main - (r == num_ranks - 1) + (num_ranks - r - 1)
        # nB1W1F1 and nWB0 each split one backward per iteration, nB1B0 its second half.
        n_i = sum(a.kind is Kind.I for a in row)
        assert n_i == sum(a.kind is Kind.W for a in row)
        # nB1B0 switches zero-bubble on at i = (r+1)//2: for B1 before it on odd r, after it on even r.
        zb_tail = (r + 1) - (r + 1) // 2
        assert n_i == 2 * (num_ranks - r - 1) + 2 * zb_tail - (r % 2 == 0)


def test_generate_names() -> None:
    assert SCHEDULES == ("dualpipe", "dualpipev", "1f1b", "zb1p")
    for name in SCHEDULES:
        assert generate(name, 4, 8).name == name
    with pytest.raises(ValueError, match="unknown schedule 'gpipe'"):
        generate("gpipe", 4, 8)


# ---- the validation grid ----------------------------------------------------------------------------------


def _grid() -> list[tuple[str, int, int]]:
    cases = []
    for name in SCHEDULES:
        for r in range(1, 17):
            if name == "dualpipe" and r % 2:
                continue
            for n in sorted({2 * r, 2 * r + 2, 3 * r + 1, 4 * r}):
                if name == "dualpipe" and n % 2:
                    n += 1
                cases.append((name, r, n))
    return cases


@pytest.mark.parametrize("name, num_ranks, num_chunks", _grid())
def test_grid_validates(name: str, num_ranks: int, num_chunks: int) -> None:
    s = generate(name, num_ranks, num_chunks)
    validate(s)
    lowered = lower_to_p2p(s)
    check_p2p_fifo(lowered)
    # Lowering keeps the compute actions in order and only adds p2p.
    assert tuple(tuple(a for a in row if a.kind.is_compute) for row in lowered.ranks) == s.ranks


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dualpipe(3, 12), "even num_ranks"),
        (lambda: dualpipe(4, 9), "even num_chunks"),
        (lambda: dualpipe(4, 6), "num_chunks >= 2 \\* num_ranks"),
        (lambda: dualpipev(4, 7), "at least 8 chunks"),
        (lambda: one_f_one_b(0, 4), "num_ranks must be a positive int"),
        (lambda: zb1p(2, 0), "num_chunks must be a positive int"),
    ],
)
def test_invalid_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---- lowering ---------------------------------------------------------------------------------------------


def test_lowering_1f1b_two_ranks() -> None:
    low = lower_to_p2p(one_f_one_b(2, 2))
    assert rows_of(low) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1".split(),
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1".split(),
    ]


def test_lowering_skips_same_rank_stages() -> None:
    # DualPipeV: stages R-1 and R share the last rank, stages 0 and 2R-1 share rank 0 (the loss is local).
    low = lower_to_p2p(dualpipev(2, 4))
    last = [str(a) for a in low.ranks[1]]
    assert "1SEND_F0" not in last and "2RECV_F0" not in last and "2SEND_B0" not in last
    assert last[:2] == ["1RECV_F0", "1F0"] and last[2] == "2F0"


def test_lowering_hoists_recv_for_fifo_order() -> None:
    """Rank 0 sends F of mb 0 then mb 1; a consumer that uses mb 1 first must still post recv 0 first."""
    topo = Topology.linear(2, 2)
    s = Schedule("swap", topo, (acts("0F0 0F1 0B0 0B1"), acts("1F1 1F0 1B0 1B1")))
    low = lower_to_p2p(s)
    assert [str(a) for a in low.ranks[1]][:4] == ["1RECV_F0", "1RECV_F1", "1F1", "1F0"]
    check_p2p_fifo(low)


# ---- failures are reported with the grid ----------------------------------------------------------------


def test_counts_missing_w() -> None:
    s = Schedule("bad", Topology.linear(1, 2), (acts("0F0 0I0 0F1 0B1"),))
    with pytest.raises(ScheduleError, match="stage 0 micro-batch 0: 1 F, 0 B, 1 I, 0 W") as info:
        check_counts(s)
    assert "<-- ERROR HERE" in str(info.value)


def test_counts_wrong_rank() -> None:
    s = Schedule("bad", Topology.linear(2, 1), (acts("0F0 1F0 0B0"), acts("1B0")))
    with pytest.raises(ScheduleError, match="lives on rank 1, not rank 0") as info:
        validate(s)
    assert (info.value.rank, info.value.step) == (0, 1)


def test_local_order_b_before_f() -> None:
    s = Schedule("bad", Topology.linear(1, 1), (acts("0B0 0F0"),))
    with pytest.raises(ScheduleError, match="runs 0B0 before 0F0") as info:
        validate(s)
    assert (info.value.rank, info.value.step) == (0, 0)
    assert "[0B0]" in str(info.value) and "<-- ERROR HERE (rank 0)" in str(info.value)


def test_local_order_w_before_i() -> None:
    s = Schedule("bad", Topology.linear(1, 1), (acts("0F0 0W0 0I0"),))
    with pytest.raises(ScheduleError, match="runs 0W0 before 0I0"):
        validate(s)


def test_overlap_pair_cannot_feed_itself() -> None:
    s = Schedule("bad", Topology.linear(1, 1), (acts("(0F0;0B0)OVERLAP_F_B"),))
    with pytest.raises(ScheduleError, match="before 0F0"):
        validate(s)


def test_cross_rank_deadlock() -> None:
    # A wait cycle: rank 1 runs 1F1 first (needs 0F1, after 0B0 on rank 0), and rank 0 runs 0B0 before
    # 0F1 (needs 1B0, after 1F1 on rank 1).
    s = Schedule("cycle", Topology.linear(2, 2), (acts("0F0 0B0 0F1 0B1"), acts("1F1 1F0 1B0 1B1")))
    with pytest.raises(ScheduleError, match="deadlock") as info:
        validate(s)
    msg = str(info.value)
    assert "rank 0 at 0B0 waits for 1B/I0" in msg and "rank 1 at 1F1 waits for 0F1" in msg
    assert "<-- ERROR HERE" in msg


def test_fifo_mismatch_detected() -> None:
    topo = Topology.linear(2, 2)
    lowered = Schedule(
        "swapped",
        topo,
        (
            acts("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"),
            acts("1RECV_F1 1F1 1RECV_F0 1F0 1B0 1SEND_B0 1B1 1SEND_B1"),
        ),
    )
    with pytest.raises(ScheduleError, match="FIFO mismatch") as info:
        check_p2p_fifo(lowered)
    assert (info.value.rank, info.value.step) == (1, 0)


def test_p2p_deadlock_detected() -> None:
    topo = Topology.linear(2, 1)
    lowered = Schedule("stuck", topo, (acts("0RECV_B0 0F0 0SEND_F0 0B0"), acts("1RECV_F0 1F0 1B0 1SEND_B0")))
    with pytest.raises(ScheduleError, match="p2p deadlock: rank 0 blocked at 0RECV_B0; rank 1 blocked at 1RECV_F0"):
        check_p2p_fifo(lowered)


def test_missing_recv_detected() -> None:
    topo = Topology.linear(2, 1)
    lowered = Schedule("norecv", topo, (acts("0F0 0SEND_F0 0RECV_B0 0B0"), acts("1F0 1B0 1SEND_B0")))
    with pytest.raises(ScheduleError, match="before receiving its input from rank 0"):
        check_p2p_fifo(lowered)


def test_unreceived_send_detected() -> None:
    topo = Topology.linear(2, 1)
    lowered = Schedule("extra", topo, (acts("0F0 0SEND_F0 0SEND_F0 0RECV_B0 0B0"), acts("1RECV_F0 1F0 1B0 1SEND_B0")))
    with pytest.raises(ScheduleError, match="never receives it"):
        check_p2p_fifo(lowered)


# ---- differential: torch.distributed.pipelining's DualPipeV plan --------------------------------------------


def _torch_dualpipev_rank(num_ranks: int, num_chunks: int, rank: int) -> list[str] | None:
    """torch's ScheduleDualPipeV plan for one rank as action strings, or None if the private API moved."""
    import types

    try:
        from torch.distributed.pipelining.schedules import ScheduleDualPipeV
    except ImportError:
        return None
    calc = getattr(ScheduleDualPipeV, "_calculate_single_rank_operations", None)
    if calc is None:
        return None
    fake = types.SimpleNamespace(pp_group_size=num_ranks, _n_microbatches=num_chunks)
    try:
        return [str(a) for a in calc(fake, rank)]
    except AttributeError:  # the helper reads other attributes in this torch version
        return None


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 7, 8])
def test_dualpipev_matches_torch(num_ranks: int) -> None:
    """Our DualPipeV equals torch.distributed.pipelining's (both follow DeepSeek's step()), action by action,
    and torch's action text parses with Action.from_str."""
    for num_chunks in (2 * num_ranks, 3 * num_ranks + 1):
        ours = dualpipev(num_ranks, num_chunks)
        for r in range(num_ranks):
            theirs = _torch_dualpipev_rank(num_ranks, num_chunks, r)
            if theirs is None:
                pytest.skip("torch's ScheduleDualPipeV._calculate_single_rank_operations is not available")
            assert [str(a) for a in ours.ranks[r]] == theirs
            assert tuple(Action.from_str(t) for t in theirs) == ours.ranks[r]


@pytest.mark.parametrize("num_ranks, num_chunks", [(2, 4), (4, 8), (4, 14), (8, 16)])
def test_dualpipe_is_dualpipev_per_half(num_ranks: int, num_chunks: int) -> None:
    """DualPipe's first-half rank r runs DualPipeV(R/2, N/2)'s rank r plan; only the stage mapping differs:
    V stage v < R/2 is chain-0 stage v, V stage v >= R/2 is chain-1 stage v + R (on the same rank)."""
    half = num_ranks // 2
    dual, v = dualpipe(num_ranks, num_chunks), dualpipev(half, num_chunks // 2)

    def relabel(a: Action) -> Action:
        if a.kind is Kind.OVERLAP_F_B:
            return Action.overlap(*(relabel(x) for x in a.sub_actions))
        return dataclasses.replace(a, stage=a.stage if a.stage < half else a.stage + num_ranks)

    for r in range(half):
        assert dual.ranks[r] == tuple(relabel(a) for a in v.ranks[r])


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(SCHEDULES),
    st.integers(1, 4),
    st.data(),
)
def test_mutated_schedules_fail_cleanly(name: str, half_ranks: int, data: st.DataObject) -> None:
    """Swapping two actions of one rank either keeps the plan valid or raises ScheduleError (never a crash)."""
    num_ranks = 2 * half_ranks if name == "dualpipe" else half_ranks
    s = generate(name, num_ranks, 2 * num_ranks + 2 * data.draw(st.integers(0, 2)))
    r = data.draw(st.integers(0, num_ranks - 1))
    row = list(s.ranks[r])
    i = data.draw(st.integers(0, len(row) - 1))
    j = data.draw(st.integers(0, len(row) - 1))
    row[i], row[j] = row[j], row[i]
    mutated = dataclasses.replace(s, ranks=s.ranks[:r] + (tuple(row),) + s.ranks[r + 1 :])
    try:
        validate(mutated)
    except ScheduleError as e:
        assert "<-- ERROR HERE" in str(e) or e.rank is None


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("num_ranks", [3, 8])
def test_linear_schedules_with_few_chunks(name: str, num_ranks: int) -> None:
    """1F1B and ZB1P take any N >= 1, also fewer micro-batches than ranks."""
    for num_chunks in range(1, num_ranks + 1):
        validate(generate(name, num_ranks, num_chunks))


@pytest.mark.parametrize(
    "rank0, match",
    [
        ("0RECV_F0 0F0 0SEND_F0 0RECV_B0 0B0", "has no peer stage"),  # stage 0 takes the inputs itself
        ("1SEND_F0 0F0 0SEND_F0 0RECV_B0 0B0", "stage 1 is not on rank 0"),
        ("0F0 0SEND_F5 0RECV_B0 0B0", "out of range"),
    ],
)
def test_malformed_p2p_actions(rank0: str, match: str) -> None:
    lowered = Schedule("bad", Topology.linear(2, 1), (acts(rank0), acts("1RECV_F0 1F0 1B0 1SEND_B0")))
    with pytest.raises(ScheduleError, match=match) as info:
        check_p2p_fifo(lowered)
    assert info.value.rank == 0


def test_validate_checks_a_lowered_plan_as_given() -> None:
    validate(lower_to_p2p(dualpipe(4, 8)))
    swapped = Schedule(
        "swapped",
        Topology.linear(2, 2),
        (
            acts("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"),
            acts("1RECV_F1 1F1 1RECV_F0 1F0 1B0 1SEND_B0 1B1 1SEND_B1"),
        ),
    )
    with pytest.raises(ScheduleError, match="FIFO mismatch"):  # 1F1 before 1F0 is fine, the recv order not
        validate(swapped)
