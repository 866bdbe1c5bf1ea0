"""moe_comm.nn: the expert-parallel MoE equals a single-process MoE (outputs and gradients); all_to_all_single."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_comm.alltoall import all_to_all_single
from moe_comm.nn import ExpertParallelMoE, GroupedExperts
from tests.harness import pool_fixture

pool = pool_fixture(1, 4)

H, F, E, K, T = 8, 12, 8, 3, 6


def _global_inputs(world: int, seed: int):
    """Every rank builds every rank's tokens and routing from one seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(world, T, H, dtype=torch.float64, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) for _ in range(world)])
    idx[0, 0, 1] = -1
    w = torch.rand(world, T, K, generator=gen, dtype=torch.float64)
    return x, idx, w


def _reference(experts: GroupedExperts, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= 0:
                out[t] += w[t, k] * experts.expert_forward(e, x[t : t + 1])[0]
    return out


def _check_moe(grouped: bool, use_async: bool):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = GroupedExperts(E, H, F, dtype=torch.float64)
    e_local = E // world
    sl = slice(rank * e_local, (rank + 1) * e_local)
    if grouped:
        local = GroupedExperts(e_local, H, F, dtype=torch.float64)
        with torch.no_grad():
            local.w1.copy_(full.w1[sl]); local.w2.copy_(full.w2[sl]); local.w3.copy_(full.w3[sl])  # noqa: E702
        params = [local.w1, local.w2, local.w3]
    else:
        local = []
        for e in range(rank * e_local, (rank + 1) * e_local):
            lin = nn.Sequential(nn.Linear(H, F, bias=False, dtype=torch.float64), nn.SiLU(), nn.Linear(F, H, bias=False, dtype=torch.float64))
            with torch.no_grad():
                lin[0].weight.copy_(full.w1[e].T); lin[2].weight.copy_(full.w2[e].T)  # noqa: E702
            local.append(lin)
        full.w3 = None
        params = [p for m in local for p in m.parameters()]
    shared = nn.Linear(H, H, dtype=torch.float64)
    moe = ExpertParallelMoE(local, E, shared_experts=shared, backend="torch")
    xs, idxs, ws = _global_inputs(world, 7)
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    if use_async:
        pending = moe.dispatch_async(x, idxs[rank], w)
        s = shared(x)
        d = pending.wait()
        out = moe.combine_async(d, moe.compute_experts(d)).wait() + s
    else:
        out = moe(x, idxs[rank], w)
    ref_x = xs[rank].clone().requires_grad_(True)
    ref_w = ws[rank].clone().requires_grad_(True)
    ref = _reference(full, ref_x, idxs[rank], ref_w) + shared(ref_x)
    # float32 weights on the wire: tolerance of float32.
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()
    gen = torch.Generator().manual_seed(rank)
    g = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    # The full model's local experts' gradient summed over ranks equals the EP local gradient.
    ref_params = [full.w1, full.w2, full.w3] if grouped else None
    if grouped:
        for p, rp in zip(params, ref_params, strict=True):
            total = rp.grad.clone()
            dist.all_reduce(total)
            assert torch.allclose(p.grad, total[sl], rtol=1e-5, atol=1e-6)
    else:
        g1, g2 = full.w1.grad.clone(), full.w2.grad.clone()
        dist.all_reduce(g1)
        dist.all_reduce(g2)
        for j, m in enumerate(local):
            e = rank * e_local + j
            t1, t2 = g1[e].T, g2[e].T
            assert torch.allclose(m[0].weight.grad, t1, rtol=1e-5, atol=1e-6), (m[0].weight.grad - t1).abs().max().item()
            assert torch.allclose(m[2].weight.grad, t2, rtol=1e-5, atol=1e-6)
    return True


def test_grouped_experts_match_reference(pool):
    assert all(pool.run(_check_moe, True, False))


def test_module_list_experts_split_phase(pool):
    assert all(pool.run(_check_moe, False, True))


def _check_all_to_all(dtype_name: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    in_splits = [(rank + j) % 3 + 1 for j in range(world)]
    out_splits = [(j + rank) % 3 + 1 for j in range(world)]
    base = torch.arange(sum(in_splits) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    inp = base.to(dtype)
    out = torch.empty(sum(out_splits), 2, dtype=dtype)
    work = all_to_all_single(out, inp, out_splits, in_splits, async_op=True)
    work.wait()
    expected = []
    for src in range(world):
        src_splits = [(src + j) % 3 + 1 for j in range(world)]
        start = sum(src_splits[:rank])
        rows = torch.arange(sum(src_splits) * 2, dtype=torch.float32).view(-1, 2)[start : start + src_splits[rank]] + 100 * src
        expected.append(rows.to(dtype))
    assert torch.equal(out.view(torch.uint8), torch.cat(expected).view(torch.uint8))
    # Equal splits, synchronous, 1-D.
    flat = torch.full((world * 2,), rank, dtype=dtype)
    got = torch.empty_like(flat)
    assert all_to_all_single(got, flat) is None
    assert torch.equal(got.float(), torch.arange(world).repeat_interleave(2).float())
    return True


def test_all_to_all_single_dtypes(pool):
    for name in ("float32", "bfloat16", "float8_e4m3fn", "int64"):
        assert all(pool.run(_check_all_to_all, name))


def _two_micro_batches_in_flight():
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    experts = GroupedExperts(E // world, H, F, dtype=torch.float64)
    moe = ExpertParallelMoE(experts, E, backend="torch")
    xs, idxs, ws = _global_inputs(world, 11)
    x0, x1 = xs[rank], xs[rank].flip(0).contiguous()
    i0, i1 = idxs[rank], idxs[rank].flip(0).contiguous()
    w0, w1 = ws[rank], ws[rank].flip(0).contiguous()
    # Two dispatches in flight at once, then two combines: what a micro-batch scheduler does.
    p0, p1 = moe.dispatch_async(x0, i0, w0), moe.dispatch_async(x1, i1, w1)
    d0 = p0.wait()
    c0 = moe.combine_async(d0, moe.compute_experts(d0))
    d1 = p1.wait()
    c1 = moe.combine_async(d1, moe.compute_experts(d1))
    y0, y1 = c0.wait(), c1.wait()
    assert torch.allclose(y0, moe(x0, i0, w0), rtol=1e-12, atol=0)
    assert torch.allclose(y1, moe(x1, i1, w1), rtol=1e-12, atol=0)
    return True


def test_two_micro_batches_in_flight(pool):
    assert all(pool.run(_two_micro_batches_in_flight))


def _all_to_all_missing_peer():
    import time

    from moe_comm import CommTimeoutError

    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        time.sleep(3.0)  # never joins
        return None
    start = time.monotonic()
    try:
        all_to_all_single(torch.empty(world), torch.zeros(world), timeout_s=1.0)
    except CommTimeoutError as exc:
        return str(exc), time.monotonic() - start
    return "no error", 0.0


def test_all_to_all_single_never_waits_forever(pool):
    # Last in the module: the abandoned collective leaves this pool's group unusable.
    if pool.world_size == 1:
        pytest.skip("a world of one has no peer to miss")
    message, elapsed = pool.run(_all_to_all_missing_peer, timeout_s=60)[0]
    assert "rank 0" in message and "all_to_all_single" in message, message
    assert 0.9 <= elapsed < 10.0
