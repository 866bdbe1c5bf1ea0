"""Draw simulated schedules: ASCII timeline, PNG (matplotlib, optional) and Chrome trace; compare schedules.

Usage::

    python -m dualpipe.visualize --schedule dualpipev --ranks 4 --chunks 16 [--costs F,B,W,FB]
        [--png out.png] [--trace out.json] [--grid]
    python -m dualpipe.visualize --compare --ranks 8 --chunks 32 [--costs 1,2,1,3]

``--costs F,B,W[,FB[,P2P]]`` are per-chunk costs (see :class:`dualpipe.simulate.Costs`); default 1,2,1
(F = W = B/2, where the published bubble formulas are exact) with FB = F + B.

The Chrome trace (open in chrome://tracing or https://ui.perfetto.dev) has one complete event (``"ph": "X"``)
per action, ``pid`` = rank, and times in microseconds with one cost unit = 1000 us.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dualpipe.ir import Action, Kind, Schedule
from dualpipe.schedules import SCHEDULES, generate
from dualpipe.simulate import Costs, SimResult, simulate

__all__ = ["main", "ascii_timeline", "chrome_trace", "save_png", "compare_table", "parse_costs"]

_US_PER_UNIT = 1000.0


def parse_costs(text: str) -> Costs:
    """Parse ``"F,B,W[,FB[,P2P]]"`` into :class:`Costs`; raises ValueError saying the expected form."""
    try:
        nums = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--costs must be numbers 'F,B,W[,FB[,P2P]]', got {text!r}") from None
    if not 2 <= len(nums) <= 5:
        raise ValueError(f"--costs takes 2 to 5 numbers 'F,B,W[,FB[,P2P]]', got {len(nums)} in {text!r}")
    f, b = nums[0], nums[1]
    w = nums[2] if len(nums) > 2 else 0.0
    fb = nums[3] if len(nums) > 3 else None
    p2p = nums[4] if len(nums) > 4 else 0.0
    return Costs(F=f, B=b, W=w, FB=fb, p2p=p2p)


def _label(a: Action) -> str:
    if a.kind is Kind.OVERLAP_F_B:
        return "+".join(str(x) for x in a.sub_actions)
    return str(a)


def ascii_timeline(result: SimResult, num_ranks: int, width: int = 160) -> str:
    """One line per rank; each action is a ``|label...`` cell whose length is proportional to its duration.

    Idle time is ``.``; ``width`` bounds the characters used for the whole makespan (at least 1 per cost unit
    of the shortest action, so very long schedules may be wider).
    """
    durations = [e.end - e.start for e in result.events if e.end > e.start]
    if not durations or result.makespan <= 0:
        return "\n".join(f"rank {r:>2} |" for r in range(num_ranks))
    shortest = min(durations)
    scale = max(width / result.makespan, 4.0 / shortest)  # chars per cost unit; shortest action >= 4 chars
    total = int(round(result.makespan * scale))
    lines = []
    for r in range(num_ranks):
        buf = ["."] * total
        for e in result.events:
            if e.rank != r:
                continue
            lo, hi = int(round(e.start * scale)), int(round(e.end * scale))
            if hi <= lo:
                continue
            text = ("|" + _label(e.action))[: hi - lo].ljust(hi - lo)
            buf[lo:hi] = list(text)
        lines.append(f"rank {r:>2} " + "".join(buf) + "|")
    axis = f"{'':8}0{'':{max(total - len(str(result.makespan)) - 1, 1)}}{result.makespan:g}"
    return "\n".join(lines + [axis])


def chrome_trace(result: SimResult, schedule: Schedule) -> dict:
    """Chrome trace-event JSON object: one "X" event per action (pid = rank, tid 0), one unit = 1000 us."""
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}}
        for r in range(schedule.topology.num_ranks)
    ]
    for e in result.events:
        events.append(
            {
                "name": _label(e.action),
                "cat": e.action.kind.value,
                "ph": "X",
                "ts": e.start * _US_PER_UNIT,
                "dur": (e.end - e.start) * _US_PER_UNIT,
                "pid": e.rank,
                "tid": 0,
                "args": {"action": str(e.action)},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"schedule": schedule.name}}


_COLORS = {Kind.F: "#4c78a8", Kind.B: "#54a24b", Kind.I: "#9ecf8b", Kind.W: "#b279a2", Kind.OVERLAP_F_B: "#f58518"}


def save_png(result: SimResult, schedule: Schedule, path: str) -> bool:
    """Draw a Gantt chart to ``path``. Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    num_ranks = schedule.topology.num_ranks
    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, result.makespan / 4)), 0.5 * num_ranks + 1.5))
    for e in result.events:
        dur = e.end - e.start
        ax.broken_barh(
            [(e.start, dur)], (e.rank - 0.4, 0.8), facecolors=_COLORS[e.action.kind], edgecolor="black", lw=0.3
        )
        if dur * 10 >= result.makespan / 40:
            ax.text(e.start + dur / 2, e.rank, _label(e.action), ha="center", va="center", fontsize=5)
    ax.set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (cost units)")
    ax.set_title(f"{schedule.name}: makespan {result.makespan:g}, max bubble {result.max_bubble:g}")
    ax.legend(
        handles=[Patch(color=c, label=k.value) for k, c in _COLORS.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=6,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def _formula(name: str, pp: int, c: Costs) -> float:
    """Published bubble for ``pp`` model stages (REFERENCE.md section 4)."""
    if name == "1f1b":
        return (pp - 1) * (c.F + c.B)
    if name == "zb1p":
        return (pp - 1) * (c.F + c.B - 2 * c.W)
    return (pp / 2 - 1) * (c.pair + c.B - 3 * c.W)


def compare_table(pp: int, num_chunks: int, costs: Costs) -> str:
    """The four schedules side by side for a model cut into ``pp`` stages.

    1F1B, ZB1P and DualPipe run on ``pp`` devices; DualPipeV runs the same ``pp`` stages on ``pp/2`` devices.
    Params/device are in units of one stage (model/pp); activations in units of one stage's activations for
    one micro-batch; "bubble" is the worst rank's idle time (makespan - busy), "formula" the published one.
    """
    header = ("schedule", "devices", "stages", "params/dev", "bubble", "formula", "peak act", "makespan")
    rows = [header]
    for name in SCHEDULES:
        ranks = pp // 2 if name == "dualpipev" else pp
        try:
            if name == "dualpipev" and pp % 2:
                raise ValueError(f"dualpipev runs {pp} stages on pp/2 devices: needs an even --ranks")
            s = generate(name, ranks, num_chunks)
        except ValueError as e:
            rows.append((name, str(ranks), "-", "-", "n/a", "-", "-", str(e).split(":")[0]))
            continue
        res = simulate(s, costs)
        topo = s.topology
        params = max(
            sum(pp / len(topo.chains[topo.chain_of(st)]) for st in topo.stages_of_rank(r)) for r in range(ranks)
        )
        rows.append(
            (
                name,
                str(ranks),
                str(topo.num_stages),
                f"{params:g}x",
                f"{res.max_bubble:g}",
                f"{_formula(name, pp, costs):g}",
                str(max(res.peak_activations)),
                f"{res.makespan:g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``python -m dualpipe.visualize``); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m dualpipe.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipev")
    p.add_argument("--ranks", type=int, default=4, help="pipeline ranks (with --compare: model stages PP)")
    p.add_argument("--chunks", type=int, default=16, help="micro-batches per step")
    p.add_argument("--costs", default="1,2,1", help="F,B,W[,FB[,P2P]] per chunk (default 1,2,1)")
    p.add_argument("--png", help="write a Gantt chart (needs matplotlib)")
    p.add_argument("--trace", help="write a Chrome trace JSON")
    p.add_argument("--grid", action="store_true", help="also print the rank x step action grid")
    p.add_argument("--width", type=int, default=160, help="ASCII timeline width in characters")
    p.add_argument("--compare", action="store_true", help="print the 4 schedules side by side")
    args = p.parse_args(argv)
    try:
        costs = parse_costs(args.costs)
        if args.compare:
            print(f"PP={args.ranks} stages, {args.chunks} micro-batches, costs {costs}")
            print(compare_table(args.ranks, args.chunks, costs))
            return 0
        schedule = generate(args.schedule, args.ranks, args.chunks)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = simulate(schedule, costs)
    print(
        f"{schedule.name}: {args.ranks} ranks, {args.chunks} chunks, costs {costs}\n"
        f"makespan {result.makespan:g}, bubble per rank {[round(b, 6) for b in result.bubble]}, "
        f"peak activations {list(result.peak_activations)}"
    )
    print(ascii_timeline(result, schedule.topology.num_ranks, args.width))
    if args.grid:
        print(schedule.format_grid())
    if args.png:
        if save_png(result, schedule, args.png):
            print(f"wrote {args.png}")
        else:
            print("matplotlib is not installed: skipping --png (pip install matplotlib)")
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(result, schedule), f)
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
