"""Backend conformance checks: rank-side bodies shared by every backend's tests.

Each ``check_*`` function runs on every rank of a :class:`moe_comm.launch.RankPool` and takes the
backend name, so the same checks run against ``torch`` on CPU (tests/test_conformance.py) and against
``cuda`` on a GPU (tests/gpu/). Inputs come from one seeded generator per rank, so every rank can build
every other rank's inputs and the expected outputs (the oracle below, written independently of the
backends: plain masks and loops over ranks).

Payloads encode their origin: the first four columns of every token hold base-16 digits of
(source rank, token index), exact in bf16, fp16, fp32 and FP8, so a misplaced row says where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_comm import Buffer
from moe_comm.fp8 import per_token_cast_to_fp8

ROUTINGS = ("uniform", "zipf", "one_rank", "empty_rank", "masked", "same_rank")
ORIGIN_COLUMNS = 4


@dataclass(frozen=True)
class Case:
    """One routing scenario, identical on every rank."""

    routing: str = "uniform"
    tokens: int = 24
    hidden: int = 64
    num_topk: int = 4
    experts_per_rank: int = 3
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def num_tokens_of(case: Case, rank: int) -> int:
    if case.routing == "empty_rank" and rank == 1:
        return 0
    return case.tokens + (rank % 3)  # ranks hold different token counts


def encode_origin(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Write base-16 digits of (rank, token index) into the first four columns of ``x [T, H]``."""
    t = torch.arange(x.shape[0])
    digits = torch.stack([torch.full_like(t, rank), (t // 256) % 16, (t // 16) % 16, t % 16], dim=1)
    x = x.clone()
    x[:, :ORIGIN_COLUMNS] = digits.to(x.dtype)
    return x


def decode_origin(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [N, H]`` -> ``(source rank [N], token index [N])`` from the first four columns."""
    d = rows[:, :ORIGIN_COLUMNS].float().round().long()
    return d[:, 0], d[:, 1] * 256 + d[:, 2] * 16 + d[:, 3]


def make_inputs(case: Case, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ``(x [T, H], topk_idx [T, K] int64, topk_weights [T, K] float32)`` on the CPU."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank)
    num_tokens = num_tokens_of(case, rank)
    num_experts = case.experts_per_rank * world
    k = min(case.num_topk, num_experts)
    x = encode_origin(torch.randn(num_tokens, case.hidden, generator=gen).to(case.dtype), rank)
    if case.routing == "zipf":
        probs = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.5
        idx = torch.stack([torch.multinomial(probs, k, replacement=False, generator=gen) for _ in range(num_tokens)]) if num_tokens else torch.empty(0, k, dtype=torch.long)
    elif case.routing == "one_rank":
        target = world - 1
        choices = torch.arange(target * case.experts_per_rank, (target + 1) * case.experts_per_rank)
        kk = min(k, case.experts_per_rank)
        idx = torch.stack([choices[torch.randperm(len(choices), generator=gen)[:kk]] for _ in range(num_tokens)]) if num_tokens else torch.empty(0, kk, dtype=torch.long)
    elif case.routing == "same_rank":
        # Several experts of a token on one rank: pick a rank, then up to K experts of it.
        kk = min(k, case.experts_per_rank)
        rows = []
        for _ in range(num_tokens):
            r = int(torch.randint(world, (1,), generator=gen))
            rows.append(r * case.experts_per_rank + torch.randperm(case.experts_per_rank, generator=gen)[:kk])
        idx = torch.stack(rows) if rows else torch.empty(0, kk, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)]) if num_tokens else torch.empty(0, k, dtype=torch.long)
    idx = idx.long()
    if case.routing == "masked" and num_tokens:
        mask = torch.rand(idx.shape, generator=gen) < 0.4
        idx = torch.where(mask, torch.full_like(idx, -1), idx)
        idx[0] = -1  # a token that goes nowhere
    weights = torch.rand(idx.shape, generator=gen, dtype=torch.float32)
    return x, idx, weights


def expected_receive(case: Case, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The oracle: what ``rank`` must receive, built with masks per source rank (no backend code)."""
    epr = case.experts_per_rank
    xs, idxs, ws, src_rank, src_tok = [], [], [], [], []
    for src in range(world):
        x, idx, w = make_inputs(case, src, world)
        owner = torch.where(idx >= 0, idx // epr, -1)
        goes = (owner == rank).any(dim=1) if idx.numel() else torch.zeros(x.shape[0], dtype=torch.bool)
        tokens = torch.nonzero(goes).flatten()
        xs.append(x[tokens])
        local = torch.where(owner[tokens] == rank, idx[tokens] - rank * epr, -1)
        idxs.append(local)
        ws.append(torch.where(local >= 0, w[tokens], 0.0))
        src_rank.append(torch.full((len(tokens),), src))
        src_tok.append(tokens)
    recv_idx = torch.cat(idxs)
    per_expert = torch.stack([(recv_idx == e).any(dim=1).sum() if recv_idx.numel() else torch.tensor(0) for e in range(epr)])
    return {
        "x": torch.cat(xs),
        "topk_idx": recv_idx,
        "topk_weights": torch.cat(ws),
        "src_rank": torch.cat(src_rank),
        "src_idx": torch.cat(src_tok),
        "per_expert": per_expert,
    }


def ranks_reached(idx: torch.Tensor, epr: int, world: int) -> torch.Tensor:
    """``[T]`` number of distinct ranks each token goes to."""
    owner = torch.where(idx >= 0, idx // epr, -1)
    return torch.stack([(owner == r).any(dim=1) for r in range(world)], dim=1).sum(dim=1) if idx.numel() else torch.zeros(idx.shape[0], dtype=torch.long)


def _setup(backend: str, case: Case, **buffer_kwargs: object) -> tuple[Buffer, int, int, torch.device]:
    rank, world = dist.get_rank(), dist.get_world_size()
    return Buffer(backend=backend, **buffer_kwargs), rank, world, device_for(backend)


# ----------------------------------------------------------------------------------------------------
# checks


def check_layout(backend: str, case: Case) -> None:
    buf, rank, world, dev = _setup(backend, case)
    _, idx, _ = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    layout = buf.get_dispatch_layout(idx.to(dev), num_experts)
    owner = torch.where(idx >= 0, idx // case.experts_per_rank, -1)
    in_rank = torch.zeros(idx.shape[0], world, dtype=torch.bool)
    for t in range(idx.shape[0]):
        for e in idx[t].tolist():
            if e >= 0:
                in_rank[t, e // case.experts_per_rank] = True
    per_expert = torch.tensor([int((idx == e).sum()) for e in range(num_experts)], dtype=torch.int32)
    assert torch.equal(layout.is_token_in_rank.cpu(), in_rank)
    assert torch.equal(layout.num_tokens_per_rank.cpu(), in_rank.sum(0).to(torch.int32))
    assert torch.equal(layout.num_tokens_per_expert.cpu(), per_expert)
    assert layout.num_tokens_per_rdma_rank is None
    del owner


def check_dispatch_combine(backend: str, case: Case, expert_alignment: int = 1, async_finish: bool = False, given_layout: bool = False) -> None:
    """Every received row, its top-k, the counts and the handle; then combine == x * ranks reached."""
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    kwargs: dict[str, object] = {}
    if given_layout:
        layout = buf.get_dispatch_layout(idx.to(dev), num_experts)
        kwargs = dict(num_tokens_per_rank=layout.num_tokens_per_rank, is_token_in_rank=layout.is_token_in_rank,
                      num_tokens_per_expert=layout.num_tokens_per_expert)
    else:
        kwargs = dict(num_experts=num_experts)
    res = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), expert_alignment=expert_alignment,
                       async_finish=async_finish, **kwargs)
    if async_finish:
        assert res.event is not None
        res.event.current_stream_wait()
    exp = expected_receive(case, rank, world)
    recv_x = res.recv_x.cpu()
    got_rank, got_tok = decode_origin(recv_x)
    assert torch.equal(got_rank, exp["src_rank"]) and torch.equal(got_tok, exp["src_idx"]), (
        f"rank {rank}: rows arrived from (rank, token) {list(zip(got_rank.tolist(), got_tok.tolist(), strict=True))[:8]}..., "
        f"expected {list(zip(exp['src_rank'].tolist(), exp['src_idx'].tolist(), strict=True))[:8]}..."
    )
    assert torch.equal(recv_x, exp["x"]), f"rank {rank}: payload bytes differ from the sources' rows"
    assert torch.equal(res.recv_topk_idx.cpu(), exp["topk_idx"])
    assert torch.equal(res.recv_topk_weights.cpu(), exp["topk_weights"])
    aligned = ((exp["per_expert"] + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()
    assert res.num_recv_tokens_per_expert_list == aligned, (res.num_recv_tokens_per_expert_list, aligned)
    handle = res.handle
    assert torch.equal(handle.recv_src_idx.cpu().long(), exp["src_idx"])
    assert torch.equal(handle.recv_src_rank.cpu().long(), exp["src_rank"])
    counts = torch.tensor(handle.recv_counts)
    assert torch.equal(handle.rank_prefix_matrix[:, rank].cpu().long(), counts.cumsum(0))
    owner = torch.where(idx >= 0, idx // case.experts_per_rank, -1)
    sent = [t for r in range(world) for t in range(x.shape[0]) if bool((owner[t] == r).any())]
    assert handle.send_token_idx.cpu().tolist() == sent, f"rank {rank}: send_token_idx is not destination-major, token order"

    # Combine: each rank scales its rows by (rank + 1), so the sum shows which ranks contributed.
    rows = (res.recv_x.float() * (rank + 1)).to(case.dtype)
    bias = torch.randn(x.shape, generator=torch.Generator().manual_seed(rank)).to(case.dtype)
    out = buf.combine(rows, handle, topk_weights=res.recv_topk_weights, bias=bias.to(dev), async_finish=async_finish)
    if async_finish:
        out.event.current_stream_wait()
    factor = torch.zeros(x.shape[0], dtype=torch.float64)
    for r in range(world):
        factor += (owner == r).any(dim=1).double() * (r + 1) if idx.numel() else 0
    ref = (x.double() * factor.unsqueeze(1) + bias.double())
    got = out.combined_x.cpu().double()
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-6}[case.dtype]
    assert torch.allclose(got, ref, rtol=tol, atol=tol * 4), f"rank {rank}: combine off by {(got - ref).abs().max()}"
    assert torch.allclose(out.combined_topk_weights.cpu(), torch.where(idx >= 0, w, 0.0), rtol=1e-6, atol=0)


def check_combine_exact(backend: str, case: Case) -> None:
    """combined == x * (number of ranks the token reached), bitwise (small integer sums are exact in float32)."""
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    res = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=case.experts_per_rank * world)
    out = buf.combine(res.recv_x, res.handle)
    n = ranks_reached(idx, case.experts_per_rank, world)
    expected = (x.float() * n.unsqueeze(1).float()).to(case.dtype)
    assert torch.equal(out.combined_x.cpu(), expected)
    assert out.combined_topk_weights is None


def check_fp8_dispatch(backend: str, case: Case) -> None:
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    data, scales = per_token_cast_to_fp8(x)
    res = buf.dispatch((data.to(dev), scales.to(dev)), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=case.experts_per_rank * world)
    recv_data, recv_scales = res.recv_x
    exp = expected_receive(case, rank, world)
    exp_data, exp_scales = per_token_cast_to_fp8(exp["x"])
    assert torch.equal(recv_data.cpu().view(torch.uint8), exp_data.view(torch.uint8)), f"rank {rank}: FP8 bytes differ"
    assert torch.equal(recv_scales.cpu(), exp_scales)
    # Cached FP8 dispatch replays the routing and carries the scales too.
    again = buf.dispatch((data.to(dev), scales.to(dev)), handle=res.handle)
    assert torch.equal(again.recv_x[0].cpu().view(torch.uint8), exp_data.view(torch.uint8))
    assert torch.equal(again.recv_x[1].cpu(), exp_scales)


def check_cached_dispatch(backend: str, case: Case) -> None:
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    res = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=case.experts_per_rank * world)
    y = encode_origin(torch.randn(x.shape, generator=torch.Generator().manual_seed(99 + rank)).to(case.dtype), rank)
    cached = buf.dispatch(y.to(dev), handle=res.handle)
    assert cached.handle is res.handle
    assert cached.recv_topk_idx is None and cached.recv_topk_weights is None
    exp_rank, exp_tok = decode_origin(res.recv_x.cpu())
    got_rank, got_tok = decode_origin(cached.recv_x.cpu())
    assert torch.equal(got_rank, exp_rank) and torch.equal(got_tok, exp_tok)
    assert cached.num_recv_tokens_per_expert_list == res.num_recv_tokens_per_expert_list


def check_worst_tokens(backend: str, case: Case) -> None:
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    worst = (case.tokens + 2) * world
    exact = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=num_experts)
    res = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=num_experts, num_worst_tokens=worst)
    n = exact.recv_x.shape[0]
    assert res.recv_x.shape[0] == worst and res.recv_topk_idx.shape[0] == worst
    assert torch.equal(res.recv_x[:n].cpu(), exact.recv_x.cpu())
    assert torch.equal(res.recv_topk_idx[:n].cpu(), exact.recv_topk_idx.cpu())
    assert torch.equal(res.recv_topk_weights[:n].cpu(), exact.recv_topk_weights.cpu())
    assert bool((res.recv_topk_idx[n:] == -1).all()) and bool((res.recv_topk_weights[n:] == 0).all())
    assert torch.equal(res.handle.recv_src_idx[:n].cpu(), exact.handle.recv_src_idx.cpu())
    assert bool((res.handle.recv_src_idx[n:] == -1).all())
    sent = exact.handle.send_token_idx.cpu()
    padded = res.handle.send_token_idx.cpu()
    assert padded.shape == (x.shape[0] * world,) and torch.equal(padded[: sent.numel()], sent)
    assert bool((padded[sent.numel() :] == -1).all())
    # Combine and cached dispatch in worst-case mode agree with exact mode.
    a = buf.combine(exact.recv_x, exact.handle, topk_weights=exact.recv_topk_weights)
    b = buf.combine(res.recv_x, res.handle, topk_weights=res.recv_topk_weights)
    assert torch.equal(a.combined_x.cpu(), b.combined_x.cpu())
    assert torch.equal(a.combined_topk_weights.cpu(), b.combined_topk_weights.cpu())
    cached = buf.dispatch(x.to(dev), handle=res.handle)
    assert torch.equal(cached.recv_x[:n].cpu(), exact.recv_x.cpu())


def check_low_latency(backend: str, case: Case, use_fp8: bool, return_recv_hook: bool) -> None:
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    max_tokens = case.tokens + 4
    res = buf.low_latency_dispatch(x.to(dev).bfloat16(), idx.to(dev), max_tokens, num_experts, use_fp8=use_fp8, return_recv_hook=return_recv_hook)
    if return_recv_hook:
        assert res.hook is not None
        res.hook()
    recv = res.recv_x
    epr = case.experts_per_rank
    # Oracle: per local expert, (source rank, token) pairs in order, then the rows.
    counts = []
    for e in range(epr):
        global_e = rank * epr + e
        pairs = []
        for src in range(world):
            xs, idxs, _ = make_inputs(case, src, world)
            toks = torch.nonzero((idxs == global_e).any(dim=1)).flatten() if idxs.numel() else torch.empty(0, dtype=torch.long)
            pairs.extend((src, int(t), xs[t]) for t in toks)
        counts.append(len(pairs))
        got_src = res.handle.src_rank[e, : len(pairs)].cpu().tolist()
        got_tok = res.handle.src_token_idx[e, : len(pairs)].cpu().tolist()
        assert got_src == [p[0] for p in pairs] and got_tok == [p[1] for p in pairs], f"rank {rank} expert {e}: slot order"
        if pairs:
            rows = torch.stack([p[2] for p in pairs]).bfloat16()
            if use_fp8:
                data, scales = per_token_cast_to_fp8(rows)
                assert torch.equal(recv[0][e, : len(pairs)].cpu().view(torch.uint8), data.view(torch.uint8))
                assert torch.equal(recv[1][e, : len(pairs)].cpu(), scales)
            else:
                assert torch.equal(recv[e, : len(pairs)].cpu(), rows)
    assert res.recv_count.cpu().tolist() == counts
    # Weighted combine: each expert's output is its input times (global expert id + 1).
    payload = recv[0].float() * recv[1].repeat_interleave(128, dim=-1)[..., : case.hidden] if use_fp8 else recv.float()
    factors = (torch.arange(epr, device=payload.device) + rank * epr + 1).float().view(epr, 1, 1)
    out = buf.low_latency_combine((payload * factors).bfloat16(), idx.to(dev), w.to(dev), res.handle, return_recv_hook=return_recv_hook)
    if return_recv_hook:
        out.hook()
    src = x.bfloat16()
    if use_fp8:
        d, s = per_token_cast_to_fp8(src)
        src = (d.float() * s.repeat_interleave(128, dim=-1)[..., : case.hidden]).bfloat16()
    coef = torch.where(idx >= 0, w.double() * (idx + 1).double(), 0.0).sum(dim=1, keepdim=True)
    ref = src.double() * coef
    got = out.combined_x.cpu().double()
    assert torch.allclose(got, ref, rtol=2e-2, atol=5e-2), f"rank {rank}: low-latency combine off by {(got - ref).abs().max()}"


def check_deterministic(backend: str, case: Case, repeats: int = 3) -> None:
    buf, rank, world, dev = _setup(backend, case)
    x, idx, w = make_inputs(case, rank, world)
    outs = []
    for _ in range(repeats):
        res = buf.dispatch(x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=case.experts_per_rank * world)
        rows = res.recv_x.float().sin().to(case.dtype)  # distinct rows per rank: float sums depend on order
        out = buf.combine(rows, res.handle, topk_weights=res.recv_topk_weights)
        outs.append((res.recv_x.cpu(), res.recv_topk_idx.cpu(), out.combined_x.cpu(), out.combined_topk_weights.cpu()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a, b.view(torch.uint8) if b.is_floating_point() else b)


# ----------------------------------------------------------------------------------------------------
# the test functions, generated per backend (a module that wants them does
# ``globals().update(conformance_tests("cuda"))`` next to its ``pool`` fixture)


def conformance_tests(backend: str) -> dict[str, object]:
    """Pytest test functions running every check above against ``backend``; each takes the ``pool`` fixture."""
    import pytest

    @pytest.mark.parametrize("routing", ROUTINGS)
    def test_layout(pool, routing):
        pool.run(check_layout, backend, Case(routing=routing, seed=1))

    @pytest.mark.parametrize("routing", ROUTINGS)
    def test_dispatch_combine(pool, routing):
        pool.run(check_dispatch_combine, backend, Case(routing=routing, seed=2))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
    def test_dispatch_combine_dtypes(pool, dtype):
        pool.run(check_dispatch_combine, backend, Case(seed=3, dtype=dtype), given_layout=True)

    def test_combine_is_x_times_ranks_reached(pool):
        pool.run(check_combine_exact, backend, Case(routing="masked", seed=4))

    def test_expert_alignment_and_async(pool):
        pool.run(check_dispatch_combine, backend, Case(seed=5), expert_alignment=8, async_finish=True)

    def test_fp8_dispatch_bit_exact(pool):
        pool.run(check_fp8_dispatch, backend, Case(seed=6, hidden=256))

    def test_cached_dispatch(pool):
        pool.run(check_cached_dispatch, backend, Case(routing="zipf", seed=7))

    @pytest.mark.parametrize("routing", ["uniform", "empty_rank"])
    def test_num_worst_tokens(pool, routing):
        pool.run(check_worst_tokens, backend, Case(routing=routing, seed=8))

    @pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
    @pytest.mark.parametrize("hook", [False, True], ids=["direct", "hook"])
    def test_low_latency(pool, use_fp8, hook):
        pool.run(check_low_latency, backend, Case(routing="masked", seed=9, hidden=128), use_fp8, hook)

    def test_repeated_runs_bitwise_identical(pool):
        pool.run(check_deterministic, backend, Case(routing="zipf", seed=10, dtype=torch.bfloat16))

    return {name: fn for name, fn in locals().items() if name.startswith("test_")}
