"""The small case scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck): every kernel family
once, on 2 ranks emulated on one GPU. Prints one line ending in ``ok`` and the rows each rank received.

Usage: python scripts/sanitizer_case.py
"""

from __future__ import annotations

import torch

from moe_comm.backends import cuda_intranode as ops
from moe_comm.backends.cuda_emulator import MultiRankEmulator


def run() -> str:
    """Layout, dispatch (bf16 with top-k weights, then FP8 with the fused cast), weighted combine, the
    low-latency expert-major rearrangement and the low-latency combine (checked against x times its summed
    weights); raises if any kernel recorded an error."""
    world, tokens, hidden, topk, experts, sms = 2, 64, 128, 4, 8, 2
    regions = MultiRankEmulator.region_bytes_for(tokens, hidden, torch.bfloat16, 1, topk, torch.bfloat16)
    emu = MultiRankEmulator(world, *regions)
    dev = emu.device
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = [torch.rand(tokens, experts, device=dev, generator=gen).topk(topk, dim=1).indices for _ in range(world)]
    weights = [torch.rand(tokens, topk, device=dev, generator=gen) for _ in range(world)]
    x = [torch.randn(tokens, hidden, device=dev, generator=gen).bfloat16() for _ in range(world)]
    plans = emu.plan(idx, experts, num_sms=sms)
    outs = emu.dispatch(plans, x, topk_idx=idx, topk_weights=weights, num_experts=experts, num_sms=sms)
    combined_weights = [torch.empty(tokens, topk, device=dev) for _ in range(world)]
    emu.combine(plans, [o.recv_x for o in outs], topk_weights=[o.recv_topk_weights for o in outs], num_sms=sms,
                weight_outputs=combined_weights)
    fused = emu.dispatch(plans, x, topk_idx=idx, num_experts=experts, num_sms=sms, cast_fp8=True)
    emu.lead(torch.cuda.current_stream(dev))
    stream, epr = torch.cuda.current_stream(dev), experts // world
    # Low-latency layout and combine on the bf16 rows, in one stream: every rank's send before any receive.
    expert_rows, slots = [], []
    for rows in (fused[0], *outs):
        n = rows.recv_x.shape[0]
        expert_rows.append(torch.empty(epr, n, hidden, dtype=rows.recv_x.dtype, device=dev))
        slots.append(torch.empty(n, topk, dtype=torch.int64, device=dev))
        scales = None if rows.recv_scales is None else torch.empty(epr, n, rows.recv_scales.shape[1], device=dev)
        ops.expert_major(rows, expert_rows[-1], scales, torch.empty(epr, dtype=torch.int32, device=dev),
                         torch.empty(epr, n, dtype=torch.int32, device=dev), torch.empty(epr, n, dtype=torch.int32, device=dev),
                         torch.empty(epr, world, 2, dtype=torch.int32, device=dev), slots[-1], sms, stream)
    for r in range(world):
        ops.low_latency_combine_send(emu.buffers[r], expert_rows[1 + r].reshape(-1, hidden), slots[1 + r],
                                     outs[r], tokens, sms, stream)
    combined = [torch.empty(tokens, hidden, dtype=torch.bfloat16, device=dev) for _ in range(world)]
    for r in range(world):
        ops.low_latency_combine_recv(emu.buffers[r], idx[r], weights[r], combined[r], epr, tokens, sms, stream)
    torch.cuda.synchronize(dev)
    emu.raise_if_failed("sanitizer case")
    for r in range(world):  # the experts are identities: each token comes back as x times its summed weights
        want = (x[r].double() * weights[r].double().sum(dim=1, keepdim=True)).cpu()
        if not torch.allclose(combined[r].double().cpu(), want, rtol=2e-2, atol=2e-2):
            raise AssertionError(f"rank {r}: low-latency combine off by {(combined[r].double().cpu() - want).abs().max()}")
    received = [o.recv_x.shape[0] for o in outs]
    emu.destroy()
    return f"rows received per rank {received}: ok"


if __name__ == "__main__":
    print(run())
