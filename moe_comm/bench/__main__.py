"""``python -m moe_comm.bench``: dispatch/combine time and bandwidth next to a raw all-to-all.

Under ``torchrun`` or ``mpirun`` it runs in the launched ranks; otherwise it spawns ``--nprocs`` local ranks
(default: one per GPU, or 4 CPU ranks over gloo without a GPU). ``--suite cuda`` runs the CUDA-kernel suite
(single-GPU multi-rank mode, copy-kernel baseline, SM sweep, overlap) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moe_comm.bench.portable import BenchShape, machine_info, run_portable_suite
from moe_comm.launch import detect_launcher, init_distributed, spawn


def _parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m moe_comm.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["portable", "cuda"], default="portable", help="what to measure (default: portable)")
    p.add_argument("--backend", default="torch", help="Buffer backend for the portable suite (default: torch)")
    p.add_argument("--nprocs", type=int, default=None, help="local ranks to spawn (default: GPUs, or 4 on CPU)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    p.add_argument("--hidden", type=int, default=7168 if gpu else 1024, help="hidden size (default 7168 on GPU, 1024 on CPU)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=gpu, help="FP8 dispatch (default on GPU)")
    p.add_argument("--check-inputs", action=argparse.BooleanOptionalAction, default=True,
                   help="Buffer(check_inputs=...): --no-check-inputs skips the cross-rank agreement step of every call")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path, default=None, help="write the records here")
    try:
        from moe_comm.bench import cuda as cuda_suite
    except ImportError:
        cuda_suite = None
    if cuda_suite is not None:
        group = p.add_argument_group("cuda suite")
        cuda_suite.add_arguments(group)
    return p


def _rank_main(shape: BenchShape, backend: str) -> list[dict[str, Any]]:
    init_distributed()
    return run_portable_suite(shape, backend)


def _print_table(records: list[dict[str, Any]]) -> None:
    header = f"{'op':<16}{'backend':<8}{'R':>3}{'dtype':>17}{'time ms':>10}{'a2a ms':>10}{'ratio':>7}{'logical GB/s':>14}{'wire GB/s':>11}  target"
    print(header)
    print("-" * len(header))
    for r in records:
        print(
            f"{r['op']:<16}{r['backend']:<8}{r['world_size']:>3}{r['dtype']:>17}{r['time_s_median'] * 1e3:>10.2f}"
            f"{r['baseline_time_s_median'] * 1e3:>10.2f}{r['ratio_to_baseline']:>7.2f}{r['logical_gb_per_s']:>14.2f}"
            f"{r['wire_gb_per_s']:>11.2f}  {'met' if r['target_met'] else 'MISSED'} ({r['target']})"
        )
    for r in records:
        if r.get("cpu_ratio_to_baseline") is not None:
            print(
                f"{r['op']} CPU per rank: {r['cpu_time_s_median'] * 1e3:.2f} ms vs {r['baseline_cpu_time_s_median'] * 1e3:.2f} ms "
                f"for the a2a ({r['cpu_ratio_to_baseline']:.2f} x); {r['ranks_on_host']} ranks kept "
                f"{100 * r['host_cpu_load']:.0f}% of {r['host_cpu_count']} cores busy ({100 * r['baseline_host_cpu_load']:.0f}% in the a2a)"
            )
    for r in records:
        if "baseline_prealloc_time_s_median" in r:
            print(
                f"{r['op']} vs the a2a into a preallocated output: {r['baseline_prealloc_time_s_median'] * 1e3:.2f} ms, "
                f"{r['ratio_to_prealloc_baseline']:.2f} x (the a2a above allocates its output per call)"
            )
    for r in records:
        if "floor_time_s_median" in r:
            print(
                f"{r['op']} floor (count round + row gather + the a2a): {r['floor_time_s_median'] * 1e3:.2f} ms = "
                f"{r['floor_ratio_to_baseline']:.2f} x the a2a; {r['op']} is {r['ratio_to_floor']:.2f} x its floor"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.time()
    if args.suite == "cuda":
        try:
            from moe_comm.bench import cuda as cuda_suite
        except ImportError as exc:
            print(f"the CUDA suite is not available in this installation: {exc}", file=sys.stderr)
            return 2
        records = cuda_suite.run_suite(args)
    else:
        shape = BenchShape(
            tokens=args.tokens, hidden=args.hidden, topk=args.topk, num_experts=args.num_experts,
            fp8_dispatch=args.fp8, warmup=args.warmup, iters=args.iters, check_inputs=args.check_inputs,
        )
        if detect_launcher() != "single":
            records = _rank_main(shape, args.backend)
            import torch.distributed as dist

            if dist.get_rank() != 0:
                return 0
        else:
            nprocs = args.nprocs or (torch.cuda.device_count() if torch.cuda.is_available() else 4)
            records = spawn(_rank_main, nprocs, shape, args.backend)[0]
    _print_table([r for r in records if "ratio_to_baseline" in r])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "command": "python -m moe_comm.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "created_unix": started,
            "machine": machine_info(),
            "results": records,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
