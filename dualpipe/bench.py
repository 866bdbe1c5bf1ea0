"""``python -m dualpipe.bench``: our DualPipeV next to ``torch.distributed.pipelining.ScheduleDualPipeV``.

Both run the same stage modules (same initial weights) on the same inputs in the same process group, in
alternation; the per-micro-batch losses are compared and the step times reported as a ratio (ours /
PyTorch's). Spawns ``--ranks`` local CPU ranks over gloo (or one per GPU with NCCL).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.pipeline import DualPipeV


class _Block(nn.Module):
    """A stage: residual MLP blocks of width ``hidden``."""

    def __init__(self, hidden: int, depth: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def _rank_main(args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    stage_ids = (rank, 2 * world - 1 - rank)
    ours_modules = [_Block(args.hidden, args.depth, seed=s).to(device) for s in stage_ids]
    theirs_modules = [copy.deepcopy(m) for m in ours_modules]
    ours = DualPipeV((ours_modules[0], ours_modules[1]))
    stages = [PipelineStage(m, s, 2 * world, device) for m, s in zip(theirs_modules, stage_ids, strict=True)]
    theirs = ScheduleDualPipeV(stages, n_microbatches=args.chunks, loss_fn=_loss, scale_grads=False)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.hidden, generator=gen).to(device)
    y = torch.randn(args.batch, args.hidden, generator=gen).to(device)

    def run_ours() -> torch.Tensor | None:
        for m in ours_modules:
            m.zero_grad(set_to_none=True)
        loss, _ = ours.step(x, num_chunks=args.chunks, criterion=_loss, labels=(y,))
        return loss

    def run_theirs() -> torch.Tensor | None:
        for m in theirs_modules:
            m.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        if rank == 0:
            theirs.step(x, target=y, losses=losses)
            return torch.stack([loss.detach() for loss in losses])
        theirs.step()
        return None

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    loss_ours = loss_theirs = None
    for it in range(args.warmup + args.iters):
        for name, fn in (("ours", run_ours), ("torch", run_theirs)):
            dist.barrier()
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if it >= args.warmup:
                times[name].append(float(elapsed.item()))
            if name == "ours":
                loss_ours = out
            else:
                loss_theirs = out
    grad_diff = max(
        (p.grad - q.grad).abs().max().item()
        for a, b in zip(ours_modules, theirs_modules, strict=True)
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    record: dict[str, Any] = {
        "rank": rank,
        "max_grad_abs_diff": grad_diff,
        "time_s_median_ours": statistics.median(times["ours"]),
        "time_s_median_torch": statistics.median(times["torch"]),
    }
    if rank == 0:
        assert loss_ours is not None and loss_theirs is not None
        record["losses_identical"] = bool(torch.equal(loss_ours.cpu(), loss_theirs.cpu()))
        record["max_loss_abs_diff"] = float((loss_ours.cpu() - loss_theirs.cpu()).abs().max())
    return record


def _spawned(args: argparse.Namespace) -> dict[str, Any]:
    from moe_comm.launch import init_distributed

    init_distributed()
    return _rank_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualpipe.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks (DualPipeV: 2 stages each)")
    parser.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= 2 * ranks)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2, help="residual MLP blocks per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from moe_comm.bench.portable import machine_info
    from moe_comm.launch import spawn

    per_rank = spawn(_spawned, args.ranks, args)
    head = per_rank[0]
    ratio = head["time_s_median_ours"] / head["time_s_median_torch"]
    summary = {
        "benchmark": "DualPipeV step: dualpipe.DualPipeV vs torch.distributed.pipelining.ScheduleDualPipeV",
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "machine": machine_info(),
        "losses_identical": head["losses_identical"],
        "max_loss_abs_diff": head["max_loss_abs_diff"],
        "max_grad_abs_diff": max(r["max_grad_abs_diff"] for r in per_rank),
        "time_s_median_ours": head["time_s_median_ours"],
        "time_s_median_torch": head["time_s_median_torch"],
        "ratio_ours_over_torch": ratio,
        "torch_version": torch.__version__,
    }
    print(
        f"DualPipeV, {args.ranks} ranks, {args.chunks} chunks: ours {head['time_s_median_ours'] * 1e3:.1f} ms, "
        f"torch {head['time_s_median_torch'] * 1e3:.1f} ms, ratio {ratio:.2f}; losses identical: {head['losses_identical']} "
        f"(max diff {head['max_loss_abs_diff']:.3g}); max grad diff {summary['max_grad_abs_diff']:.3g}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
