"""CPU tests of the schedule IR: action text, topologies, CSV round-trip, the error grid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, Topology

A = Action.from_str


@pytest.mark.parametrize(
    "text, stage, kind, mb",
    [
        ("2F0", 2, Kind.F, 0),
        ("7B1", 7, Kind.B, 1),
        ("0I12", 0, Kind.I, 12),
        ("15W3", 15, Kind.W, 3),
        ("3SEND_F1", 3, Kind.SEND_F, 1),
        ("3RECV_F1", 3, Kind.RECV_F, 1),
        ("10SEND_B2", 10, Kind.SEND_B, 2),
        ("1RECV_B0", 1, Kind.RECV_B, 0),
    ],
)
def test_action_text(text: str, stage: int, kind: Kind, mb: int) -> None:
    a = A(text)
    assert (a.stage, a.kind, a.microbatch) == (stage, kind, mb)
    assert str(a) == text
    assert a.computes() == (a,)
    assert a.kind.is_compute == (kind in (Kind.F, Kind.B, Kind.I, Kind.W))


def test_overlap_text() -> None:
    a = A("(0F3;7B1)OVERLAP_F_B")
    assert a.kind is Kind.OVERLAP_F_B and a.stage == -1 and a.microbatch is None
    assert a.sub_actions == (Action(0, Kind.F, 3), Action(7, Kind.B, 1))
    assert str(a) == "(0F3;7B1)OVERLAP_F_B"
    assert a == Action.overlap(Action(0, Kind.F, 3), Action(7, Kind.B, 1))
    assert a.computes() == a.sub_actions


@given(
    st.integers(0, 99),
    st.sampled_from([k for k in Kind if k is not Kind.OVERLAP_F_B]),
    st.integers(0, 999),
)
def test_action_round_trip(stage: int, kind: Kind, mb: int) -> None:
    a = Action(stage, kind, mb)
    assert A(str(a)) == a


@pytest.mark.parametrize(
    "text",
    [
        "",
        "F0",
        "2F",
        "2X0",
        "-1F0",
        "2 F 0",
        "(0F3)OVERLAP_F_B",
        "(0F3;7B1;1F1)OVERLAP_F_B",
        "(7B1;0F3)OVERLAP_F_B",
        "(0F3;7W1)OVERLAP_F_B",
        "2OVERLAP_F_B0",
    ],
)
def test_action_invalid_text_names_it(text: str) -> None:
    with pytest.raises(ValueError, match="invalid action") as info:
        A(text)
    assert repr(text) in str(info.value)


def test_action_invariants() -> None:
    with pytest.raises(ValueError):
        Action(0, Kind.F, None)
    with pytest.raises(ValueError):
        Action(0, Kind.OVERLAP_F_B, None, (A("0F0"), A("1B0")))  # stage must be -1
    with pytest.raises(ValueError):
        Action(0, Kind.F, 0, (A("0F0"),))


def test_linear_topology() -> None:
    t = Topology.linear(3, 5)
    assert t.stage_rank == (0, 1, 2) and t.chains == ((0, 1, 2),) and t.chain_microbatches == (5,)
    assert [t.next_stage(s) for s in range(3)] == [1, 2, None]
    assert [t.prev_stage(s) for s in range(3)] == [None, 0, 1]
    assert t.stages_of_rank(1) == (1,)


def test_v_topology() -> None:
    t = Topology.v_shape(3, 6)
    assert t.stage_rank == (0, 1, 2, 2, 1, 0)
    assert t.chains == ((0, 1, 2, 3, 4, 5),)
    assert t.stages_of_rank(0) == (0, 5) and t.stages_of_rank(2) == (2, 3)
    assert t.next_stage(2) == 3 and t.next_stage(5) is None and t.prev_stage(0) is None
    assert t.num_microbatches(4) == 6


def test_dual_topology() -> None:
    t = Topology.dual(4, 10)
    assert t.stage_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert t.chains == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert t.chain_microbatches == (5, 5)
    assert t.chain_of(2) == 0 and t.chain_of(6) == 1
    assert t.next_stage(3) is None and t.prev_stage(4) is None and t.next_stage(4) == 5
    assert t.stages_of_rank(0) == (0, 7) and t.stages_of_rank(3) == (3, 4)


@pytest.mark.parametrize(
    "args",
    [
        (0, (), ((),), (1,)),
        (2, (0, 2), ((0, 1),), (1,)),  # rank out of range
        (2, (0, 1), ((0,),), (1,)),  # stage 1 in no chain
        (2, (0, 1), ((0, 1),), (0,)),  # zero micro-batches
        (2, (0, 1), ((0, 1),), (1, 1)),  # count per chain
    ],
)
def test_topology_rejects_bad_layouts(args: tuple) -> None:
    with pytest.raises(ValueError):
        Topology(*args)


def _tiny() -> Schedule:
    rows = (tuple(map(A, ["0F0", "0F1", "0B0", "0B1"])), tuple(map(A, ["1F0", "(1F1;1B0)OVERLAP_F_B", "1B1"])))
    return Schedule("tiny", Topology.linear(2, 2), rows)


def test_csv_round_trip() -> None:
    s = _tiny()
    text = s.to_csv()
    assert text == "0F0,0F1,0B0,0B1\n1F0,(1F1;1B0)OVERLAP_F_B,1B1\n"
    assert Schedule.from_csv(text, "tiny", s.topology) == s


def test_csv_errors() -> None:
    topo = Topology.linear(2, 2)
    with pytest.raises(ValueError, match="row 1"):
        Schedule.from_csv("0F0\n1Q0\n", "x", topo)
    with pytest.raises(ValueError, match="3 rows"):
        Schedule.from_csv("0F0\n1F0\n2F0\n", "x", topo)
    assert Schedule.from_csv("0F0,,0B0\n", "x", topo).ranks == ((A("0F0"), A("0B0")), ())


def test_grid_marks_step() -> None:
    grid = _tiny().format_grid(mark=(1, 1))
    lines = grid.splitlines()
    assert lines[1].split() == ["Rank", "0", "Rank", "1"]
    assert lines[2].startswith("Step 0: 0F0")
    assert "[(1F1;1B0)OVERLAP_F_B]" in lines[3] and lines[3].endswith("<-- ERROR HERE (rank 1)")
    assert "ERROR" not in "\n".join(lines[:3] + lines[4:])


def test_schedule_error_carries_grid() -> None:
    err = ScheduleError("boom", _tiny(), (0, 2))
    assert isinstance(err, ValueError)
    assert (err.rank, err.step) == (0, 2)
    assert str(err).startswith("boom\n") and "<-- ERROR HERE (rank 0)" in str(err) and err.grid in str(err)


def test_schedule_rank_count_checked() -> None:
    with pytest.raises(ValueError, match="rank rows"):
        Schedule("x", Topology.linear(2, 1), ((),))


def test_schedule_pickles() -> None:
    """Spawned runtime workers receive plans by pickle; the topology's stage->chain index must survive."""
    import pickle

    topo = Topology.dual(4, 8)
    s = Schedule("x", topo, ((A("0F0"),), (), (), (A("(4F0;3B0)OVERLAP_F_B"),)))
    t = pickle.loads(pickle.dumps(s))
    assert t == s and hash(t.topology) == hash(topo) and t.topology.chain_of(5) == 1
