"""CPU tests of the simulator against hand-worked timelines and the published closed forms, and of the CLI.

Bubble definition pinned here: ``bubble[r] = makespan - busy[r]`` (idle time of rank r over the whole step)
and the published formulas (REFERENCE.md section 4) are ``max_bubble``, the worst rank's idle time:

* 1F1B   (PP-1)(F+B)          for any costs;
* ZB1P   (PP-1)(F+B-2W)       for W <= F (the zero-bubble paper's regime);
* DualPipe / DualPipeV (PP/2-1)(F&B+B-3W) exactly when F = W = B/2, for any F&B; smaller when W < F.

PP is the number of model stages per chain: the rank count for 1F1B, ZB1P and DualPipe, and 2 x ranks for
DualPipeV (which runs PP stages on PP/2 devices). Peak activations are counted in (stage, micro-batch)
activations: +1 at the start of an F, -1 at the end of its B or W (see dualpipe/simulate.py). With that unit
1F1B and ZB1P peak at PP (rank 0), DualPipe and DualPipeV at PP+1, as in the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dualpipe.ir import Action, Schedule, ScheduleError, Topology
from dualpipe.schedules import dualpipe, dualpipev, generate, one_f_one_b, zb1p
from dualpipe.simulate import Costs, Event, simulate
from dualpipe.visualize import compare_table, main, parse_costs

A = Action.from_str


def test_1f1b_two_ranks_by_hand() -> None:
    res = simulate(one_f_one_b(2, 2), Costs(F=1, B=2))
    assert res.events == (
        Event(0, 0, 1, A("0F0")),
        Event(0, 1, 2, A("0F1")),
        Event(0, 4, 6, A("0B0")),  # after 1B0 ends at 4
        Event(0, 7, 9, A("0B1")),
        Event(1, 1, 2, A("1F0")),
        Event(1, 2, 4, A("1B0")),
        Event(1, 4, 5, A("1F1")),
        Event(1, 5, 7, A("1B1")),
    )
    assert res.makespan == 9 and res.busy == (6, 6) and res.bubble == (3, 3) and res.max_bubble == 3
    assert res.peak_activations == (2, 1)


def test_p2p_latency_on_cross_rank_edges() -> None:
    res = simulate(one_f_one_b(2, 2), Costs(F=1, B=2, p2p=0.5))
    ends = {str(e.action): (e.start, e.end) for e in res.events}
    assert ends["1F0"] == (1.5, 2.5) and ends["0B0"] == (5.0, 7.0) and ends["1F1"] == (4.5, 5.5)
    assert ends["0B1"] == (8.0, 10.0) and res.makespan == 10.0


def test_overlap_pair_and_split_backward_durations() -> None:
    topo = Topology.linear(1, 2)
    s = Schedule("x", topo, (tuple(map(A, ["0F0", "(0F1;0B0)OVERLAP_F_B", "0I1", "0W1"])),))
    res = simulate(s, Costs(F=1, B=3, W=1, FB=3.5))
    assert [(e.start, e.end) for e in res.events] == [(0, 1), (1, 4.5), (4.5, 6.5), (6.5, 7.5)]
    # live: 1 after 0F0; the pair allocates 0F1 before freeing 0B0 -> 2; W frees the last one.
    assert res.peak_activations == (2,)


def test_lowered_plan_simulates_like_compute_plan() -> None:
    from dualpipe.validate import lower_to_p2p

    s = dualpipev(3, 8)
    c = Costs(1, 2, 1, 2.5, p2p=0.25)
    assert simulate(lower_to_p2p(s), c).makespan == simulate(s, c).makespan


def test_deadlock_raises_with_grid() -> None:
    s = Schedule(
        "cycle",
        Topology.linear(2, 2),
        (tuple(map(A, "0F0 0B0 0F1 0B1".split())), tuple(map(A, "1F1 1F0 1B0 1B1".split()))),
    )
    with pytest.raises(ScheduleError, match="deadlock") as info:
        simulate(s, Costs(1, 2))
    assert (info.value.rank, info.value.step) == (0, 1) and "<-- ERROR HERE (rank 0)" in str(info.value)


def test_costs_checked() -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        Costs(F=1, B=1, W=2)
    with pytest.raises(ValueError, match="Costs.F"):
        Costs(F=-1, B=1)
    assert Costs(1, 3, 1).I == 2 and Costs(1, 2).pair == 3 and Costs(1, 2, FB=2.5).pair == 2.5


# ---- closed forms -----------------------------------------------------------------------------------------

COSTS_ANY = [Costs(1, 2, 1), Costs(1, 2, 0.5), Costs(1, 3, 1), Costs(2, 3, 1), Costs(1.5, 2.5, 0.25)]


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("costs", COSTS_ANY)
def test_1f1b_and_zb1p_closed_forms(pp: int, costs: Costs) -> None:
    n = 2 * pp + 3
    one = simulate(one_f_one_b(pp, n), costs)
    assert one.max_bubble == pytest.approx((pp - 1) * (costs.F + costs.B))
    assert one.peak_activations[0] == pp and max(one.peak_activations) == pp
    zb = simulate(zb1p(pp, n), costs)
    assert costs.W <= costs.F
    assert zb.max_bubble == pytest.approx((pp - 1) * (costs.F + costs.B - 2 * costs.W))
    assert max(zb.peak_activations) == pp


def _dual_bubble(pp: int, c: Costs) -> float:
    return (pp / 2 - 1) * (c.pair + c.B - 3 * c.W)


@pytest.mark.parametrize("fb", [None, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("num_ranks", [2, 4, 6, 8, 16])
def test_dualpipe_closed_form_at_f_eq_w_eq_half_b(num_ranks: int, fb: float | None) -> None:
    c = Costs(F=1, B=2, W=1, FB=fb)
    for n in (2 * num_ranks, 3 * num_ranks + 2):
        res = simulate(dualpipe(num_ranks, n), c)
        assert res.max_bubble == pytest.approx(_dual_bubble(num_ranks, c))
        assert max(res.peak_activations) == num_ranks + 1


@pytest.mark.parametrize("fb", [None, 2.0, 2.5])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_dualpipev_closed_form_at_f_eq_w_eq_half_b(num_ranks: int, fb: float | None) -> None:
    c = Costs(F=2, B=4, W=2, FB=fb if fb is None else 2 * fb)
    pp = 2 * num_ranks  # DualPipeV: PP stages on PP/2 devices
    for n in (2 * num_ranks, 3 * num_ranks + 1):
        res = simulate(dualpipev(num_ranks, n), c)
        assert res.max_bubble == pytest.approx(_dual_bubble(pp, c))
        assert max(res.peak_activations) == pp + 1


def test_reference_example_dualpipe_pp8() -> None:
    res = simulate(dualpipe(8, 16), Costs(F=1, B=2, W=1, FB=3))
    assert res.max_bubble == 6.0


@pytest.mark.parametrize("name, pp", [("dualpipe", 8), ("dualpipev", 8)])
def test_dual_bubble_smaller_when_w_below_f(name: str, pp: int) -> None:
    c = Costs(F=1, B=2, W=0.5, FB=3)
    res = simulate(generate(name, pp if name == "dualpipe" else pp // 2, 2 * pp), c)
    assert res.max_bubble < _dual_bubble(pp, c)


# ---- CLI --------------------------------------------------------------------------------------------------


def test_parse_costs() -> None:
    assert parse_costs("1,2,1,3") == Costs(1, 2, 1, 3)
    assert parse_costs("1,2") == Costs(1, 2)
    assert parse_costs("1,2,1,3,0.5").p2p == 0.5
    with pytest.raises(ValueError, match="F,B,W"):
        parse_costs("1")
    with pytest.raises(ValueError, match="numbers"):
        parse_costs("a,b")


def test_cli_timeline_and_trace(tmp_path, capsys) -> None:
    trace = tmp_path / "t.json"
    png = tmp_path / "t.png"
    assert (
        main(
            [
                "--schedule",
                "dualpipev",
                "--ranks",
                "4",
                "--chunks",
                "16",
                "--trace",
                str(trace),
                "--png",
                str(png),
                "--costs",
                "1,2,1,3",
                "--grid",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "makespan" in out and "bubble per rank [6.0, 6.0, 6.0, 6.0]" in out
    assert out.count("rank  ") == 4 and "|0F0" in out and "Step 00:" in out
    assert ("wrote " + str(png)) in out or "matplotlib is not installed" in out
    data = json.loads(trace.read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {0, 1, 2, 3}
    assert len(xs) == sum(len(r) for r in dualpipev(4, 16).ranks)
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)


def test_cli_rejects_bad_args(capsys) -> None:
    assert main(["--schedule", "dualpipe", "--ranks", "3", "--chunks", "12"]) == 2
    assert "even num_ranks" in capsys.readouterr().err


def test_compare_table() -> None:
    table = compare_table(8, 32, Costs(1, 2, 1, 3))
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    # schedule devices stages params/dev bubble formula peak makespan
    assert rows["1f1b"][1:7] == ["8", "8", "1x", "21", "21", "8"]
    assert rows["zb1p"][1:7] == ["8", "8", "1x", "7", "7", "8"]
    assert rows["dualpipe"][1:7] == ["8", "16", "2x", "6", "6", "9"]
    assert rows["dualpipev"][1:7] == ["4", "8", "2x", "6", "6", "9"]


def test_cli_compare_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dualpipe.visualize", "--compare", "--ranks", "4", "--chunks", "8"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "dualpipev" in out and "params/dev" in out


def test_stage_cost_overrides() -> None:
    base = Costs(F=1, B=2)
    heavy_loss = {1: Costs(F=2, B=4)}
    res = simulate(one_f_one_b(2, 2), base, stage_costs=heavy_loss)
    spans = {str(e.action): (e.start, e.end) for e in res.events}
    assert spans["1F0"] == (1, 3) and spans["1B0"] == (3, 7) and spans["0B0"] == (7, 9)
    assert spans["1F1"] == (7, 9) and spans["1B1"] == (9, 13) and spans["0B1"] == (13, 15)
    # A pair uses its forward stage's FB when set, else F(forward) + B(backward).
    topo = Topology.linear(1, 2)
    s = Schedule("x", topo, (tuple(map(A, ["0F0", "(0F1;0B0)OVERLAP_F_B", "0B1"])),))
    assert simulate(s, base, stage_costs={0: Costs(F=1, B=2, FB=2.5)}).makespan == 1 + 2.5 + 2
    assert simulate(s, base, stage_costs={0: Costs(F=3, B=2)}).makespan == 3 + 5 + 2
    # Overrides equal to the defaults change nothing.
    plan = dualpipe(4, 8)
    c = Costs(1, 2, 1, 2.5)
    assert simulate(plan, c, stage_costs={s: c for s in range(8)}) == simulate(plan, c)
