"""Bad input raises a clear error naming the argument, on every rank, without hanging anyone."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_comm import Buffer, PeerArgumentError
from moe_comm.fp8 import per_token_cast_to_fp8
from tests.harness import pool_fixture

pool = pool_fixture(2, 3)


def _inputs(rank: int, tokens: int = 8, hidden: int = 32, experts: int = 6, k: int = 2):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=gen)
    return x, idx, w


def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return type(exc).__name__, str(exc)
    return "ok", ""


def _bad_expert_id_on_one_rank():
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", timeout_s=30)
    x, idx, w = _inputs(rank, experts=3 * world)
    if rank == world - 1:
        idx[2, 1] = 3 * world  # one past the last expert
    return _outcome(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=3 * world))


def test_bad_expert_id_raises_on_every_rank(pool):
    outcomes = pool.run(_bad_expert_id_on_one_rank)
    *others, last = outcomes
    assert last[0] == "ValueError" and "topk_idx" in last[1] and "[-1," in last[1]
    for kind, message in others:
        assert kind == PeerArgumentError.__name__ and f"rank {len(outcomes) - 1}" in message and "topk_idx" in message


def _local_errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", timeout_s=30)
    x, idx, w = _inputs(rank, experts=3 * world)
    experts = 3 * world
    data, scales = per_token_cast_to_fp8(x)
    results = {
        "x_int": _outcome(lambda: buf.dispatch(x.int(), topk_idx=idx, num_experts=experts)),
        "x_3d": _outcome(lambda: buf.dispatch(x.unsqueeze(0), topk_idx=idx, num_experts=experts)),
        "idx_int32": _outcome(lambda: buf.dispatch(x, topk_idx=idx.int(), num_experts=experts)),
        "weights_f16": _outcome(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w.half(), num_experts=experts)),
        "weights_without_idx": _outcome(
            lambda: buf.dispatch(x, is_token_in_rank=buf.get_dispatch_layout(idx, experts).is_token_in_rank, topk_weights=w, num_experts=experts)
        ),
        "experts_indivisible": _outcome(lambda: buf.dispatch(x, topk_idx=idx % world, num_experts=experts + 1)),
        "fp8_scales_shape": _outcome(lambda: buf.dispatch((data, scales[:, :0]), topk_idx=idx, num_experts=experts)),
        "fp8_scales_dtype": _outcome(lambda: buf.dispatch((data, scales.half()), topk_idx=idx, num_experts=experts)),
        "layout_experts": _outcome(lambda: buf.get_dispatch_layout(idx, experts + 1)),
    }
    res = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts)
    other = Buffer(backend="torch", timeout_s=30)
    results["foreign_handle"] = _outcome(lambda: other.combine(res.recv_x, res.handle))
    results["combine_rows"] = _outcome(lambda: buf.combine(res.recv_x[1:], res.handle))
    results["combine_bias"] = _outcome(lambda: buf.combine(res.recv_x, res.handle, bias=torch.zeros(1, 1)))
    results["cached_with_topk"] = _outcome(lambda: buf.dispatch(x, handle=res.handle, topk_idx=idx))
    ll = buf.low_latency_dispatch(x, idx, x.shape[0], experts, use_fp8=False)
    wrong_out = torch.empty(x.shape, dtype=torch.float32)
    results["ll_out_dtype"] = _outcome(lambda: buf.low_latency_combine(ll.recv_x, idx, w, ll.handle, out=wrong_out))
    return results


EXPECTED = {
    "x_int": ("TypeError", "x: dtype torch.int32"),
    "x_3d": ("ValueError", "x: expected a 2-D"),
    "idx_int32": ("TypeError", "topk_idx: expected torch.int64"),
    "weights_f16": ("TypeError", "topk_weights: expected torch.float32"),
    "weights_without_idx": ("ValueError", "topk_weights: given without topk_idx"),
    "experts_indivisible": ("ValueError", "num_experts:"),
    "fp8_scales_shape": ("ValueError", "x[1] (FP8 scales): expected shape"),
    "fp8_scales_dtype": ("TypeError", "x[1] (FP8 scales): expected torch.float32"),
    "layout_experts": ("ValueError", "num_experts:"),
    "foreign_handle": ("ValueError", "handle: this handle was made by another Buffer"),
    "combine_rows": ("ValueError", "x: expected"),
    "combine_bias": ("ValueError", "bias[0]: expected"),
    "cached_with_topk": ("ValueError", "topk_idx/topk_weights: a cached dispatch"),
    "ll_out_dtype": ("ValueError", "out: expected a contiguous"),
}


def test_local_errors_name_the_argument(pool):
    for results in pool.run(_local_errors):
        for case, (kind, fragment) in EXPECTED.items():
            got_kind, message = results[case]
            assert got_kind == kind and fragment in message, f"{case}: got {got_kind}: {message}"


def _disagreement(what: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", timeout_s=30)
    x, idx, w = _inputs(rank, experts=3 * world)
    if what == "hidden" and rank == 0:
        x = torch.randn(x.shape[0], 48).bfloat16()
    if what == "dtype" and rank == 0:
        x = x.float()
    experts = 3 * world
    if what == "num_experts" and rank == 0:
        experts = 6 * world
    async_finish = what == "async_finish" and rank == 0

    def call():
        res = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts, async_finish=async_finish)
        if res.event is not None:
            res.event.current_stream_wait()

    return _outcome(call)


@pytest.mark.parametrize(
    "what,fragment",
    [
        ("hidden", "x (hidden size) differs between ranks"),
        ("dtype", "x (dtype) differs"),
        ("num_experts", "num_experts differs"),
        ("async_finish", "async_finish differs"),
    ],
)
def test_cross_rank_disagreement_raises_everywhere(pool, what, fragment):
    for kind, message in pool.run(_disagreement, what):
        assert kind == "ValueError" and fragment in message, message


def _mismatched_ops():
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", timeout_s=30)
    x, idx, w = _inputs(rank, experts=3 * world)
    res = buf.dispatch(x, topk_idx=idx, num_experts=3 * world)
    if rank == 0:
        return _outcome(lambda: buf.dispatch(x, topk_idx=idx, num_experts=3 * world))
    return _outcome(lambda: buf.combine(res.recv_x, res.handle))


def test_ranks_calling_different_operations(pool):
    for kind, message in pool.run(_mismatched_ops):
        assert kind == "RuntimeError" and "ranks called different operations" in message, message


def _buffer_args():
    return {
        "sms": _outcome(lambda: Buffer(backend="torch", num_sms=0)),
        "backend": _outcome(lambda: Buffer(backend="nope")),
        "experts": _outcome(lambda: Buffer(backend="torch", num_experts=dist.get_world_size() * 2 + 1)),
    }


def test_buffer_constructor_errors(pool):
    for results in pool.run(_buffer_args):
        assert results["sms"][0] == "ValueError" and "num_sms" in results["sms"][1]
        assert results["backend"][0] == "ValueError" and "unknown backend" in results["backend"][1]
    sizes_divide = pool.world_size == 1 or (pool.world_size * 2 + 1) % pool.world_size == 0
    for results in pool.run(_buffer_args):
        assert results["experts"][0] == ("ok" if sizes_divide else "ValueError")
