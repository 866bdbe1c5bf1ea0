"""The portable suite: dispatch, cached dispatch and combine of ``moe_comm.Buffer`` next to a raw all-to-all.

Runs on every rank of an initialised default group (gloo on CPU, NCCL on GPUs). The baseline of each
operation is ``torch.distributed.all_to_all_single`` of exactly the rows the operation moves (same split
sizes, rows already in destination order, so it is the transfer alone), timed in alternation with it.

Legend: T tokens per rank, H hidden, K top-k, E experts, R ranks, S rows sent, N rows received.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_comm import cpu_kernels, host_memory
from moe_comm.bench.timing import time_interleaved
from moe_comm.buffer import Buffer
from moe_comm.collectives import StepContext, all_gather_rows, wait_all
from moe_comm.fp8 import per_token_cast_to_fp8

__all__ = ["BenchShape", "machine_info", "run_portable_suite"]

# The target for the portable backend: each op at most this many times its raw all-to-all.
PORTABLE_TARGET_RATIO = 1.3


@dataclass(frozen=True)
class BenchShape:
    """One benchmark configuration (identical on every rank)."""

    tokens: int
    hidden: int
    topk: int
    num_experts: int
    fp8_dispatch: bool
    warmup: int
    iters: int
    seed: int = 0
    check_inputs: bool = True  # Buffer(check_inputs=...): False skips the agreement step (no extra collective)


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: host, CPU count, accelerator, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": None,
        "cpu_kernels": cpu_kernels.available()[1],  # whether CPU ranks ran moe_comm._cpu or the PyTorch code
        "host_huge_pages": host_memory.huge_pages_available()[1],  # large CPU outputs on 2 MiB pages or not
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_device"] = props.name
        info["cuda_sm_count"] = props.multi_processor_count
        info["cuda_runtime"] = torch.version.cuda
    return info


def _routing(shape: BenchShape, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x [T, H]`` bf16, ``topk_idx [T, K]`` (K distinct experts, uniform) and ``topk_weights [T, K]``."""
    gen = torch.Generator().manual_seed(shape.seed * 7919 + rank)
    x = torch.randn(shape.tokens, shape.hidden, generator=gen).to(torch.bfloat16)
    scores = torch.rand(shape.tokens, shape.num_experts, generator=gen)
    idx = scores.topk(shape.topk, dim=1).indices.to(torch.int64)
    weights = torch.rand(shape.tokens, shape.topk, generator=gen)
    return x.to(device), idx.to(device), weights.to(device)


def _row_bytes(hidden: int, fp8: bool) -> int:
    return hidden + 4 * ((hidden + 127) // 128) if fp8 else 2 * hidden


def payload_bytes(payload: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[T, row_bytes]`` uint8: each token's row as it travels (FP8 data followed by its scales)."""
    if isinstance(payload, tuple):
        data, scales = payload
        return torch.cat([data.view(torch.uint8), scales.view(torch.uint8)], dim=1)
    return payload.view(torch.uint8)


def _bytes_per_rank(counts_into_me: tuple[int, ...], rank: int, row_bytes: int, group: dist.ProcessGroup | None) -> tuple[float, float]:
    """Mean over ranks of (logical, wire) bytes received: all rows, and rows from other ranks."""
    logical = sum(counts_into_me) * row_bytes
    wire = (sum(counts_into_me) - counts_into_me[rank]) * row_bytes
    t = torch.tensor([float(logical), float(wire)], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    t = t.cpu() / dist.get_world_size(group)
    return float(t[0]), float(t[1])


def run_portable_suite(shape: BenchShape, backend: str = "torch") -> list[dict[str, Any]]:
    """Measure dispatch, cached dispatch and combine against raw all-to-alls; every rank returns the records."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = Buffer(backend=backend, check_inputs=shape.check_inputs)
    x, idx, weights = _routing(shape, rank, device)
    payload: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = per_token_cast_to_fp8(x) if shape.fp8_dispatch else x
    layout = buf.get_dispatch_layout(idx, shape.num_experts)
    layout_kwargs = dict(
        num_tokens_per_rank=layout.num_tokens_per_rank,
        is_token_in_rank=layout.is_token_in_rank,
        num_tokens_per_expert=layout.num_tokens_per_expert,
        topk_idx=idx,
        topk_weights=weights,
    )
    first = buf.dispatch(payload, **layout_kwargs)
    handle = first.handle
    assert handle.send_counts is not None and handle.recv_counts is not None
    send_counts, recv_counts = list(handle.send_counts), list(handle.recv_counts)
    recv_x = first.recv_x[0] if isinstance(first.recv_x, tuple) else first.recv_x
    expert_out = torch.randn(recv_x.shape, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(device)

    row_bytes = _row_bytes(shape.hidden, shape.fp8_dispatch)
    # The baselines get their input rows already in destination order and allocate their output, as a
    # caller of all_to_all_single does: the transfer alone, with none of the routing work.
    send_rows = torch.randint(0, 255, (sum(send_counts), row_bytes), dtype=torch.uint8, device=device)
    back_send = torch.randint(0, 255, (sum(recv_counts), 2 * shape.hidden), dtype=torch.uint8, device=device)

    def raw_dispatch() -> None:
        recv_rows = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv_rows, send_rows, recv_counts, send_counts)

    # The floor of any dispatch built on all_to_all_single: the transfer plus what the routing forces on it,
    # one round of counts (a receiver cannot size its output before it knows them) and one gather of the
    # rows into destination order; none of the top-k, side channel or checks.
    count_row = torch.zeros(1, world + 1, dtype=torch.int64, device=device)
    count_table = torch.empty(world, world + 1, dtype=torch.int64, device=device)
    staged = torch.empty(sum(send_counts), row_bytes, dtype=torch.uint8, device=device)
    rows_by_token = payload_bytes(payload)
    step = StepContext(dist.group.WORLD, rank, "floor", buf.timeout_s)

    def floor_dispatch() -> None:
        wait_all(step, [all_gather_rows(step, count_table, count_row)], "counts", spin=True)
        count_table.tolist()
        torch.index_select(rows_by_token, 0, handle.send_token_idx, out=staged)
        recv_rows = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv_rows, staged, recv_counts, send_counts)

    def raw_combine() -> None:
        back_recv = torch.empty(sum(send_counts), 2 * shape.hidden, dtype=torch.uint8, device=device)
        dist.all_to_all_single(back_recv, back_send, send_counts, recv_counts)

    # The transfer alone, into outputs allocated once. On CPU a fresh output above glibc's mmap threshold
    # (32 MiB at most) is mapped anew, so its pages fault and are zeroed on every call: the baselines above
    # pay that, as does dispatch for its recv_x (a new tensor per call), while combine receives into reused
    # scratch. These records show how much of a ratio that accounts for.
    dispatch_out = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8, device=device)
    combine_out = torch.empty(sum(send_counts), 2 * shape.hidden, dtype=torch.uint8, device=device)

    def raw_dispatch_prealloc() -> None:
        dist.all_to_all_single(dispatch_out, send_rows, recv_counts, send_counts)

    def raw_combine_prealloc() -> None:
        dist.all_to_all_single(combine_out, back_send, send_counts, recv_counts)

    ops = {
        "dispatch": lambda: buf.dispatch(payload, **layout_kwargs),
        "dispatch_baseline": raw_dispatch,
        "dispatch_floor": floor_dispatch,
        "cached_dispatch": lambda: buf.dispatch(payload, handle=handle),
        "cached_dispatch_baseline": raw_dispatch,
        "combine": lambda: buf.combine(expert_out, handle),
        "combine_baseline": raw_combine,
        "dispatch_baseline_prealloc": raw_dispatch_prealloc,
        "combine_baseline_prealloc": raw_combine_prealloc,
    }
    times = time_interleaved(ops, device=device, warmup=shape.warmup, iters=shape.iters)
    dispatch_bytes = _bytes_per_rank(tuple(recv_counts), rank, row_bytes, None)
    # Combine sends back what dispatch received: the token owner receives one bf16 row per (token, rank).
    combine_bytes = _bytes_per_rank(tuple(send_counts), rank, 2 * shape.hidden, None)
    dtype = "fp8_e4m3+scales" if shape.fp8_dispatch else "bfloat16"
    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = os.cpu_count() or 1

    def host_load(timing: dict[str, Any]) -> float:
        # Share of the host's cores the ranks kept busy during the op: near 1, the host is CPU-bound and
        # the op's time over its baseline's tends to the ratio of their CPU times.
        return ranks_on_host * timing["cpu_median"] / (cores * timing["median"]) if timing["median"] > 0 else 0.0

    records = []
    for op, op_dtype, (logical, wire) in (
        ("dispatch", dtype, dispatch_bytes),
        ("cached_dispatch", dtype, dispatch_bytes),
        ("combine", "bfloat16", combine_bytes),
    ):
        t, base = times[op], times[f"{op}_baseline"]
        prealloc = times["combine_baseline_prealloc" if op == "combine" else "dispatch_baseline_prealloc"]
        ratio = t["median"] / base["median"]
        # The op and its baseline run back to back in every iteration, so machine noise (other ranks'
        # scheduling on an oversubscribed host) hits both; the median of the per-iteration ratios is the
        # steadier statistic and is reported next to the ratio of the medians.
        paired = statistics.median(a / b for a, b in zip(t["samples"], base["samples"], strict=True) if b > 0)
        floor = {}
        if op == "dispatch":
            f = times["dispatch_floor"]
            floor = dict(
                floor="count round (spin-waited all-to-all of R+1 int64) + index_select of the rows + the baseline transfer",
                floor_time_s_median=f["median"],
                floor_ratio_to_baseline=f["median"] / base["median"],
                ratio_to_floor=t["median"] / f["median"],
                floor_time_s_samples=f["samples"],
            )
        records.append(
            dict(
                op=op,
                backend=buf.backend_name,
                transport=str(dist.get_backend()),
                world_size=world,
                tokens=shape.tokens,
                hidden=shape.hidden,
                topk=shape.topk,
                num_experts=shape.num_experts,
                dtype=op_dtype,
                check_inputs=shape.check_inputs,
                time_s_median=t["median"],
                time_s_min=t["min"],
                baseline="torch.distributed.all_to_all_single of the same rows (pre-permuted) and split sizes, output allocated per call",
                baseline_time_s_median=base["median"],
                ratio_to_baseline=ratio,
                ratio_paired_median=paired,
                baseline_prealloc="the same all_to_all_single into an output allocated once (the transfer alone)",
                baseline_prealloc_time_s_median=prealloc["median"],
                ratio_to_prealloc_baseline=t["median"] / prealloc["median"],
                baseline_prealloc_time_s_samples=prealloc["samples"],
                time_s_samples=t["samples"],
                baseline_time_s_samples=base["samples"],
                cpu_time_s_median=t["cpu_median"],
                baseline_cpu_time_s_median=base["cpu_median"],
                cpu_ratio_to_baseline=t["cpu_median"] / base["cpu_median"] if base["cpu_median"] > 0 else None,
                cpu_time="process CPU time (all threads, user + system) one run costs a rank, mean over ranks",
                host_cpu_load=host_load(t),
                baseline_host_cpu_load=host_load(base),
                ranks_on_host=ranks_on_host,
                host_cpu_count=cores,
                logical_bytes=logical,
                wire_bytes=wire,
                logical_gb_per_s=logical / t["median"] / 1e9,
                wire_gb_per_s=wire / t["median"] / 1e9,
                target=f"time <= {PORTABLE_TARGET_RATIO} x baseline",
                target_met=bool(ratio <= PORTABLE_TARGET_RATIO),
                shape=asdict(shape),
                **floor,
            )
        )
    buf.destroy()
    return records
