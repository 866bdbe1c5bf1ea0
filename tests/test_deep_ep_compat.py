"""moe_comm.deep_ep: DeepEP-style code (constructor, static helpers, positional Config, the event chaining of
DeepEP's README) runs unchanged and gives bitwise what moe_comm.Buffer gives on the same inputs; the
low-latency extras (cumulative receive stats, hooks) and the unsupported arguments behave as documented."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_comm import Buffer, EventOverlap, deep_ep
from tests.conformance import Case, make_inputs
from tests.harness import pool_fixture

pool = pool_fixture(2, 3)


def _same(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    assert (got is None) == (want is None), what
    if got is not None:
        assert got.dtype == want.dtype and torch.equal(got, want), what


def _normal_mode_like_deepep_readme(seed: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(routing="masked", seed=seed)
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    deep_ep.Buffer.set_num_sms(24)
    hidden_bytes = x.shape[1] * x.element_size()
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world)
                        for config in (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world)))
    with deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes, 0) as buf, Buffer(backend="torch") as ref:
        assert buf.num_sms == 24 and buf.num_nvl_bytes == num_nvl_bytes and not buf.low_latency_mode
        previous = deep_ep.Buffer.capture()
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous = \
            buf.get_dispatch_layout(idx, num_experts, previous_event=previous, async_finish=True,
                                    allocate_on_comm_stream=True)
        assert num_tokens_per_rdma_rank is None and isinstance(previous, EventOverlap)
        recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
            previous_event=previous, async_finish=True, allocate_on_comm_stream=True)
        event.current_stream_wait()
        combined_x, combined_w, event = buf.combine(recv_x, handle, topk_weights=recv_topk_weights, async_finish=True,
                                                    previous_event=deep_ep.Buffer.capture())
        event.current_stream_wait()
        cached_x, *_, no_wait = buf.dispatch(x, handle=handle)
        no_wait.current_stream_wait()  # a no-op event, as DeepEP returns one

        want = ref.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
        want_combined = ref.combine(want.recv_x, want.handle, topk_weights=want.recv_topk_weights)
        for got, exp, what in ((recv_x, want.recv_x, "recv_x"), (recv_topk_idx, want.recv_topk_idx, "recv_topk_idx"),
                               (recv_topk_weights, want.recv_topk_weights, "recv_topk_weights"),
                               (combined_x, want_combined.combined_x, "combined_x"),
                               (combined_w, want_combined.combined_topk_weights, "combined_topk_weights"),
                               (cached_x, want.recv_x, "cached recv_x")):
            _same(got, exp, f"rank {rank} {what}")
        assert counts == want.num_recv_tokens_per_expert_list


def _record_num_sms(buf: deep_ep.Buffer, seen: list[int]) -> None:
    """Make ``buf``'s backend note the SM budget of every dispatch request it gets."""
    original = buf.backend.dispatch

    def dispatch(request):
        seen.append(request.num_sms)
        return original(request)

    buf.backend.dispatch = dispatch


def _config_reaches_the_calls() -> None:
    seen: list[int] = []
    x, idx, w = make_inputs(Case(), dist.get_rank(), dist.get_world_size())
    experts = Case().experts_per_rank * dist.get_world_size()
    with deep_ep.Buffer(None, backend="torch") as buf:
        _record_num_sms(buf, seen)
        deep_ep.Buffer.set_num_sms(10)  # after construction: read at the call, as DeepEP does
        buf.dispatch(x, topk_idx=idx, num_experts=experts)
        buf.dispatch(x, topk_idx=idx, num_experts=experts, config=deep_ep.Config(6, 6, 256, 6, 128))
    with deep_ep.Buffer(None, backend="torch", num_sms=14) as own:  # an explicit num_sms wins over the class's
        _record_num_sms(own, seen)
        own.dispatch(x, topk_idx=idx, num_experts=experts)
    assert seen == [10, 6, 14], seen


def _low_latency_with_stats(hook: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(routing="masked", seed=5, hidden=256)
    x, idx, w = make_inputs(case, rank, world)
    num_experts, max_tokens = case.experts_per_rank * world, case.tokens + 4
    stats = torch.zeros(case.experts_per_rank, dtype=torch.int32)
    with deep_ep.Buffer(None, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, case.hidden, world, num_experts),
                        low_latency_mode=True, num_qps_per_rank=case.experts_per_rank) as buf, Buffer(backend="torch") as ref:
        total = torch.zeros_like(stats)
        for _ in range(2):
            recv_x, recv_count, handle, event, recv_hook = buf.low_latency_dispatch(
                x.bfloat16(), idx, max_tokens, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=False,
                return_recv_hook=hook)
            if hook:
                recv_hook()
            event.current_stream_wait()
            total += recv_count
            out, event, combine_hook = buf.low_latency_combine(recv_x, idx, w, handle, return_recv_hook=hook)
            if hook:
                combine_hook()
        assert torch.equal(stats, total), (stats, total)
        want = ref.low_latency_dispatch(x.bfloat16(), idx, max_tokens, num_experts, use_fp8=False)
        _same(recv_count, want.recv_count, f"rank {rank} recv_count")
        want_out = ref.low_latency_combine(want.recv_x, idx, w, want.handle)
        _same(out, want_out.combined_x, f"rank {rank} low-latency combine")


def _unsupported_arguments_are_named() -> None:
    case = Case(hidden=256)
    x, idx, w = make_inputs(case, dist.get_rank(), dist.get_world_size())
    num_experts = case.experts_per_rank * dist.get_world_size()
    with deep_ep.Buffer(None, backend="torch") as buf:
        for kwargs, name in (({"round_scale": True}, "round_scale"), ({"use_ue8m0": True}, "use_ue8m0"),
                             ({"dispatch_wait_recv_cost_stats": torch.zeros(2)}, "dispatch_wait_recv_cost_stats"),
                             ({"cumulative_local_expert_recv_stats": torch.zeros(case.experts_per_rank, dtype=torch.int32),
                               "async_finish": True}, "cumulative_local_expert_recv_stats"),
                             ({"cumulative_local_expert_recv_stats": torch.zeros(case.experts_per_rank + 1, dtype=torch.int32)},
                              "cumulative_local_expert_recv_stats")):
            with pytest.raises(ValueError, match=name):
                buf.low_latency_dispatch(x.bfloat16(), idx, case.tokens + 4, num_experts, **kwargs)
        res = buf.low_latency_dispatch(x.bfloat16(), idx, case.tokens + 4, num_experts, use_fp8=False)
        for kwargs, name in (({"use_logfmt": True}, "use_logfmt"), ({"zero_copy": True}, "zero_copy")):
            with pytest.raises(ValueError, match=name):
                buf.low_latency_combine(res.recv_x, idx, w, res.handle, **kwargs)
        with pytest.raises(NotImplementedError, match="get_local_buffer_tensor"):
            buf.get_local_buffer_tensor(torch.bfloat16)
        buf.clean_low_latency_buffer(case.tokens + 4, case.hidden, num_experts)
        buf.low_latency_combine(res.recv_x, idx, w, res.handle)  # the Buffer still works after the refused calls


@pytest.mark.parametrize("seed", [1, 2])
def test_normal_mode_like_deepep_readme(pool, seed):
    pool.run(_normal_mode_like_deepep_readme, seed)


def test_config_reaches_the_calls(pool):
    pool.run(_config_reaches_the_calls)


@pytest.mark.parametrize("hook", [False, True], ids=["direct", "hook"])
def test_low_latency_with_stats(pool, hook):
    pool.run(_low_latency_with_stats, hook)


def test_unsupported_arguments_are_named(pool):
    pool.run(_unsupported_arguments_are_named)


def test_config_is_deepeps_positional_config():
    config = deep_ep.Config(24, 8, 256, 6, 128)
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == (24, 8, 256, 6, 128)
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8) == 0 and config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(ValueError, match="new_num_sms"):
        deep_ep.Buffer.set_num_sms(0)
