"""``python -m moe_comm.bench --suite cuda``: the intranode kernels on one GPU, R ranks emulated in-process.

Measured at the given shape (default DeepSeek-V3: 4096 tokens per rank, hidden 7168, top-8 of 256 experts,
FP8 dispatch with scales, bf16 combine), with uniform random routing, R = ``--cuda-world-size`` ranks:

* ``dispatch`` / ``combine``: all R ranks' kernels (each rank ``num_sms`` blocks, ranks concurrent on their own
  streams), next to the baseline: R concurrent SM-bounded copy kernels, each moving that rank's logical bytes
  once with the same ``num_sms``. Target: baseline time / op time >= 0.80. In this emulation every byte
  crosses HBM twice (write into the destination's region, copy out of it), where on a real node the first
  crossing is the NVLink write; so the emulated ratio is bounded near 0.5 and the record says so.
* every timed run of those (op and baseline) starts with L2 flushed, outside the timed interval;
* an SM sweep of both (``--cuda-sm-sweep``; per-rank SMs, R * SMs <= the GPU's SMs) and a PNG plot;
* overlap: a large bf16 matmul on the compute stream while dispatch + combine loop on the emulated ranks with
  ``--cuda-overlap-sms`` SMs in total; target: matmul keeps >= 0.85 * (total - comm SMs) / total of its solo speed.

Records follow the bench schema (op, backend, world_size, tokens, hidden, topk, num_experts, dtype, num_sms,
time_s_median, baseline_time_s_median, logical_bytes, wire_bytes, target, target_met).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """CUDA-suite options (the shape options --tokens/--hidden/--topk/--num-experts are shared)."""
    parser.add_argument("--cuda-world-size", type=int, default=8, help="emulated ranks on one GPU (default 8)")
    parser.add_argument("--cuda-num-sms", type=int, default=16, help="SMs per emulated rank for the headline records")
    parser.add_argument("--cuda-sm-sweep", default="2,4,8,12,16", help="comma-separated per-rank SM counts to sweep")
    parser.add_argument("--cuda-overlap-sms", type=int, default=24, help="SMs all emulated ranks use together in the overlap test")
    parser.add_argument("--cuda-plot", type=Path, default=None, help="write the SM-sweep plot PNG here")


def _l2_flush_buffer() -> torch.Tensor:
    """A device buffer twice the size of the L2 cache (32 MiB of L2 assumed where the property is missing):
    zeroing it evicts whatever an earlier run left in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (32 << 20)
    return torch.empty(2 * l2, dtype=torch.uint8, device="cuda")


def _time(fn: Callable[[], None], warmup: int, iters: int, flush: torch.Tensor | None = None) -> float:
    """Median seconds of ``fn`` on the current stream (``fn`` makes the current stream wait for its work).

    With ``flush``, that buffer is zeroed before each timed run, outside the timed interval, so no run finds
    its inputs in L2 from the previous one (DeepEP's method)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _record(**kw: Any) -> dict[str, Any]:
    base = {"op": None, "backend": "cuda", "world_size": None, "tokens": None, "hidden": None, "topk": None,
            "num_experts": None, "dtype": None, "num_sms": None, "time_s_median": None,
            "baseline_time_s_median": None, "logical_bytes": None, "wire_bytes": None, "target": None,
            "target_met": False}
    base.update(kw)
    return base


class _Setup:
    """Inputs, plans and outputs of every emulated rank at the benchmark shape."""

    def __init__(self, world: int, tokens: int, hidden: int, topk: int, experts: int, seed: int = 0) -> None:
        from moe_comm.backends import cuda_intranode as ops
        from moe_comm.backends.cuda_emulator import MultiRankEmulator

        dev = torch.device("cuda", torch.cuda.current_device())
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.world, self.topk, self.experts = world, topk, experts
        xs = [torch.randn(tokens, hidden, device=dev, generator=gen).bfloat16() for _ in range(world)]
        scores = [torch.rand(tokens, experts, device=dev, generator=gen) for _ in range(world)]
        self.idx = [s.topk(topk, dim=1).indices for s in scores]
        self.weights = [torch.rand(tokens, topk, device=dev, generator=gen) for _ in range(world)]
        fp8 = [ops.per_token_cast_fp8(x) for x in xs]
        self.x = [f[0] for f in fp8]
        self.scales = [f[1] for f in fp8]
        self.num_scales = self.scales[0].shape[1]
        torch.cuda.synchronize()
        tmp = MultiRankEmulator(world, 1 << 20, 1 << 20, device=dev)
        plans = tmp.plan(self.idx, experts)
        tmp.destroy()
        max_rows = plans[0].max_rows
        self.emu = MultiRankEmulator(world, *MultiRankEmulator.region_bytes_for(max_rows, hidden, torch.float8_e4m3fn, self.num_scales, topk, torch.bfloat16), device=dev)
        self.plans = self.emu.plan(self.idx, experts)
        self.outs = [ops.allocate_dispatch_outputs(p, x, self.num_scales, topk, True, True, False) for p, x in zip(self.plans, self.x, strict=True)]
        self.rows = [p.num_recv_rows for p in self.plans]
        self.combine_in = [torch.randn(n, hidden, device=dev, generator=gen).bfloat16() for n in self.rows]
        self.combine_out = [torch.empty(tokens, hidden, dtype=torch.bfloat16, device=dev) for _ in range(world)]
        record = ops.dispatch_record_bytes(hidden, self.num_scales, topk)
        # Logical bytes per rank: the records it receives (row + scales + top-k ids/weights + source index).
        self.dispatch_bytes = [n * record for n in self.rows]
        self.combine_bytes = [n * hidden * 2 for n in self.rows]
        # Wire bytes: rows that cross to another rank.
        self.wire_rows = sum(int(p.num_tokens_per_rank.sum()) - int(p.num_tokens_per_rank[r]) for r, p in enumerate(self.plans))

    def dispatch(self, sms: int) -> None:
        cur = torch.cuda.current_stream()
        self.emu.follow(cur)
        self.emu.dispatch(self.plans, self.x, self.scales, self.idx, self.weights, self.experts, sms, self.outs)
        self.emu.lead(cur)

    def combine(self, sms: int) -> None:
        cur = torch.cuda.current_stream()
        self.emu.follow(cur)
        self.emu.combine(self.plans, self.combine_in, num_sms=sms, outputs=self.combine_out)
        self.emu.lead(cur)


def _copy_baseline(setup: _Setup, per_rank_bytes: list[int], sms: int) -> Callable[[], None]:
    """R concurrent SM-bounded copies, one per emulated rank's stream, of that rank's bytes."""
    from moe_comm.backends import cuda as cb

    dev = setup.emu.device
    srcs = [torch.empty(max(n, 16), dtype=torch.uint8, device=dev) for n in per_rank_bytes]
    dsts = [torch.empty_like(s) for s in srcs]

    def run() -> None:
        cur = torch.cuda.current_stream()
        setup.emu.follow(cur)
        for stream, src, dst in zip(setup.emu.streams, srcs, dsts, strict=True):
            with torch.cuda.stream(stream):
                cb.sm_copy(dst, src, sms)
        setup.emu.lead(cur)

    return run


def run_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise SystemExit("--suite cuda needs a CUDA device")
    from moe_comm.backends import cuda as cb

    ok, reason = cb.extension_status()
    if not ok:
        raise SystemExit(f"--suite cuda: {reason}")
    world = getattr(args, "cuda_world_size", 8)
    tokens, hidden, topk, experts = args.tokens, args.hidden, args.topk, args.num_experts
    warmup, iters = getattr(args, "warmup", 3), getattr(args, "iters", 10)
    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    shape = {"world_size": world, "tokens": tokens, "hidden": hidden, "topk": topk, "num_experts": experts,
             "device": torch.cuda.get_device_name(0), "emulated": f"{world} ranks in one process on one GPU"}
    setup = _Setup(world, tokens, hidden, topk, experts)
    headline = getattr(args, "cuda_num_sms", 16)
    sweep = sorted({int(s) for s in str(getattr(args, "cuda_sm_sweep", "2,4,8,12,16")).split(",") if s} | {headline})
    sweep = [s for s in sweep if s * world <= total_sms] or [max(1, total_sms // world)]
    records: list[dict[str, Any]] = []
    flush = _l2_flush_buffer()
    for op, per_rank, dtype, fn in (
        ("dispatch", setup.dispatch_bytes, "float8_e4m3fn", setup.dispatch),
        ("combine", setup.combine_bytes, "bfloat16", setup.combine),
    ):
        row_bytes = per_rank[0] // max(setup.rows[0], 1)
        for sms in sweep:
            t_op = _time(lambda s=sms, f=fn: f(s), warmup, iters, flush)
            setup.emu.raise_if_failed(op)
            t_copy = _time(_copy_baseline(setup, per_rank, sms), warmup, iters, flush)
            ratio = t_copy / t_op
            records.append(_record(
                op=op if sms == headline else f"{op}_sweep", dtype=dtype, num_sms=sms, time_s_median=t_op,
                baseline_time_s_median=t_copy, baseline="R concurrent sm_copy kernels, same SMs per rank, same logical bytes",
                logical_bytes=sum(per_rank), wire_bytes=setup.wire_rows * row_bytes,
                bandwidth_gbps=sum(per_rank) / t_op / 1e9, baseline_bandwidth_gbps=sum(per_rank) / t_copy / 1e9,
                fraction_of_copy=ratio, target="baseline time / op time >= 0.80", target_met=ratio >= 0.80,
                note="emulation moves every byte through HBM twice (region write + copy out); on a real node the first is the NVLink write",
                **shape))
            print(f"{op:>8} sms/rank={sms:>3}: {t_op * 1e3:8.3f} ms, copy {t_copy * 1e3:8.3f} ms, fraction {ratio:.3f}", flush=True)

    # Overlap: matmul solo vs while dispatch + combine loop with `overlap_sms` SMs across all ranks.
    overlap_total = getattr(args, "cuda_overlap_sms", 24)
    per_rank_sms = max(1, overlap_total // world)
    comm_sms = per_rank_sms * world
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    solo = _time(lambda: a @ b, 2, 5)
    loops = max(2, int(solo / max(_time(lambda: (setup.dispatch(per_rank_sms), setup.combine(per_rank_sms)), 1, 3), 1e-6)) * 3)
    cur = torch.cuda.current_stream()
    setup.emu.follow(cur)
    for _ in range(loops):  # comm work queued on the rank streams, not joined to the compute stream
        setup.emu.dispatch(setup.plans, setup.x, setup.scales, setup.idx, setup.weights, setup.experts, per_rank_sms, setup.outs)
        setup.emu.combine(setup.plans, setup.combine_in, num_sms=per_rank_sms, outputs=setup.combine_out)
    loaded = _time(lambda: a @ b, 0, 3)
    torch.cuda.synchronize()
    setup.emu.raise_if_failed("overlap")
    kept = solo / loaded
    target = 0.85 * (total_sms - comm_sms) / total_sms
    records.append(_record(op="overlap_matmul_with_dispatch_combine", dtype="bfloat16", num_sms=comm_sms,
                           time_s_median=loaded, baseline_time_s_median=solo, logical_bytes=2 * n * n * n,
                           wire_bytes=None, target=f"kept throughput >= {target:.3f}", target_met=kept >= target,
                           kept_fraction=kept, comm_sms_total=comm_sms, comm_sms_per_rank=per_rank_sms, **shape))
    print(f"overlap: matmul keeps {kept:.3f} of solo with {comm_sms} comm SMs (target {target:.3f})", flush=True)
    setup.emu.destroy()
    del flush

    plot = getattr(args, "cuda_plot", None) or (Path(args.json).with_suffix(".png") if getattr(args, "json", None) else None)
    if plot is not None:
        _plot(records, plot)
    return records


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for op in ("dispatch", "combine"):
        pts = sorted((r["num_sms"], r["bandwidth_gbps"], r["baseline_bandwidth_gbps"]) for r in records if r["op"] in (op, f"{op}_sweep"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=op)
        ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle="--", label=f"{op} copy baseline")
    ax.set_xlabel("SMs per emulated rank"), ax.set_ylabel("GB/s (all ranks)"), ax.legend(), ax.grid(True)
    fig.savefig(path, dpi=100)
