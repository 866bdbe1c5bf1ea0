"""``python -m moe_comm.model --preset deepseek-v3-h800``: tables for planning, and a plot.

Prints (1) the model against DeepEP's published H800 numbers, (2) bytes per link and time of one MoE layer's
dispatch and combine at the chosen scale, (3) the SMs needed to saturate the bottleneck link, and (4) step
time, bubble and exposed communication of 1F1B, ZB1P, DualPipe and DualPipeV.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from moe_comm.model import (
    ASSUMPTIONS,
    PRESETS,
    MoEShape,
    estimate_schedules,
    layer_traffic,
    sms_to_saturate,
    validate_deepep,
)

_SCENARIOS = {
    # name: (hardware preset, EP size, PP size, nodes per token)
    "deepseek-v3-h800": ("h800", 64, 16, 4),
    "deepseek-v3-h100": ("h100", 64, 16, 4),
    "deepseek-v3-h200": ("h200", 64, 16, 4),
    "deepseek-v3-b200": ("b200", 64, 16, 4),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_comm.model", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(_SCENARIOS), default="deepseek-v3-h800")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per micro-batch")
    p.add_argument("--layers-per-stage", type=int, default=4, help="MoE layers in one pipeline stage")
    p.add_argument("--activated-params-per-layer", type=float, default=0.6e9, help="parameters a token touches per layer")
    p.add_argument("--tflops", type=float, default=400.0, help="effective compute rate per GPU (TFLOP/s)")
    p.add_argument("--chunks", type=int, default=32, help="micro-batches per step")
    p.add_argument("--comm-sms", type=int, default=20)
    p.add_argument("--per-sm-gbps", type=float, default=25.0, help="measured copy rate of one SM (GB/s)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=Path("moe_comm_model.png"))
    args = p.parse_args(argv)
    hw, ep, pp, node_limit = _SCENARIOS[args.preset]
    cluster = PRESETS[hw].with_nodes(ep // PRESETS[hw].gpus_per_node)
    shape = MoEShape(tokens_per_rank=args.tokens, node_limit=node_limit)
    report: dict = {"preset": args.preset, "cluster": asdict(cluster), "shape": asdict(shape), "assumptions": list(ASSUMPTIONS)}

    print("1. DeepEP H800 published vs this model (ideal links; ratio = achieved efficiency)")
    print(f"   {'mode':<12}{'EP':>4} {'op':<9}{'unit':<5}{'model':>9}{'published':>11}{'ratio':>7}")
    validation = validate_deepep()
    for row in validation:
        print(f"   {row.mode:<12}{row.ep:>4} {row.op:<9}{row.unit:<5}{row.predicted:>9.1f}{row.published:>11.1f}{row.ratio:>7.2f}")
    report["validation"] = [asdict(r) | {"ratio": r.ratio} for r in validation]

    print(f"\n2. One MoE layer at {args.preset} (EP {ep}, {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs), per GPU")
    traffic = {}
    for hier in (True, False):
        for op in ("dispatch", "combine"):
            t = layer_traffic(cluster, shape, op, hierarchical=hier)
            traffic[(op, hier)] = t
            label = "hierarchical" if hier else "direct"
            print(f"   {op:<9}{label:<13} NVLink {t.nvlink_bytes / 1e6:8.1f} MB  RDMA {t.rdma_bytes / 1e6:8.1f} MB  "
                  f"{t.time_us:8.0f} us  bottleneck {t.bottleneck}")
    no_limit = layer_traffic(cluster, MoEShape(tokens_per_rank=args.tokens, node_limit=0), "dispatch")
    print(f"   without node-limited routing, dispatch RDMA grows to {no_limit.rdma_bytes / 1e6:.1f} MB ({no_limit.time_us:.0f} us)")
    report["traffic"] = {f"{op}/{'hierarchical' if h else 'direct'}": asdict(t) for (op, h), t in traffic.items()}

    d, c = traffic[("dispatch", True)], traffic[("combine", True)]
    sms = sms_to_saturate(d, cluster, args.per_sm_gbps)
    print(f"\n3. SMs to saturate the bottleneck ({d.bottleneck}, {cluster.nic_gbps if d.bottleneck == 'rdma' else cluster.nvlink_gbps:g} GB/s) "
          f"at {args.per_sm_gbps:g} GB/s per SM: {sms}")
    report["sms_to_saturate"] = sms

    flops = 2 * args.activated_params_per_layer * args.tokens * args.layers_per_stage
    forward_us = flops / (args.tflops * 1e12) * 1e6
    comm_us = args.layers_per_stage * (d.time_us + c.time_us)
    print(f"\n4. Pipeline, PP {pp}, {args.chunks} micro-batches: F {forward_us:.0f} us, B {2 * forward_us:.0f} us, W {forward_us:.0f} us, "
          f"EP communication {comm_us:.0f} us per chunk each way")
    estimates = estimate_schedules(pp=pp, num_chunks=args.chunks, F=forward_us, B=2 * forward_us, W=forward_us,
                                   comm_f=comm_us, comm_b=comm_us, sm_total=cluster.sm_count, comm_sms=args.comm_sms)
    print(f"   {'schedule':<10}{'step ms':>10}{'bubble ms':>11}{'exposed comm ms':>17}{'peak act.':>11}")
    for e in estimates:
        print(f"   {e.schedule:<10}{e.step_time / 1e3:>10.1f}{e.bubble / 1e3:>11.1f}{e.exposed_comm / 1e3:>17.1f}{e.peak_activations:>11}")
    report["pipeline"] = [asdict(e) for e in estimates]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [e.schedule for e in estimates]
        compute = [(e.step_time - e.exposed_comm) / 1e3 for e in estimates]
        exposed = [e.exposed_comm / 1e3 for e in estimates]
        ax.bar(names, compute, label="step without communication")
        ax.bar(names, exposed, bottom=compute, label="exposed EP communication")
        ax.set_ylabel("ms per step")
        ax.set_title(f"{args.preset}: PP {pp}, EP {ep}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")
    except ImportError:
        print("\nmatplotlib is not installed: no plot (pip install 'moe-comm[bench]')")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
