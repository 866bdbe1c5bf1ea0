"""CUDA graphs over ``backend="cuda"``: a decode step (tests/graph_steps.py) captured once per rank and replayed on
new inputs gives bitwise what the same step run eagerly on the same Buffer gives, replays and eager steps
interleaved. Ranks are processes sharing the one GPU (gloo for the host-side exchanges, CUDA IPC between the
symmetric buffers), as in test_cuda_conformance.py. Skipped without a GPU or the extension.

The kernel model (tests/test_cuda_model.py, every CI run) checks the same steps by replaying their launches.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gpu import skip_module_without_cuda

pytestmark = pytest.mark.gpu

skip_module_without_cuda()

from moe_comm import Buffer  # noqa: E402
from tests.conformance import Case, make_inputs  # noqa: E402
from tests.graph_steps import make_step  # noqa: E402
from tests.harness import pool_fixture  # noqa: E402

pool = pool_fixture(2, 4, timeout_s=120.0)


def _graphed_step_matches_eager(kind: str, replays: int = 3) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(routing="masked", seed=31, hidden=512)
    dev = torch.device("cuda", torch.cuda.current_device())
    x, idx, w = (t.to(dev) for t in make_inputs(case, rank, world))
    num_experts = case.experts_per_rank * world
    gen = torch.Generator(device=dev).manual_seed(7919 + rank)
    with Buffer(backend="cuda") as buf:
        graphed = make_step(kind, buf, x, idx, w, num_experts, case.tokens + 4)
        eager = make_step(kind, buf, x, idx, w, num_experts, case.tokens + 4)
        warmup = torch.cuda.Stream(dev)
        warmup.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(warmup):
            graphed()  # sizes the symmetric buffers, which a capture must not reallocate
        torch.cuda.current_stream(dev).wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = graphed()
        for round_ in range(replays):
            fresh = torch.randn(x.shape, generator=gen, device=dev).to(x.dtype)
            graphed.x.copy_(fresh)
            graph.replay()
            got = out.clone()
            eager.x.copy_(fresh)
            want = eager()
            torch.cuda.synchronize(dev)
            buf.raise_if_failed()
            assert torch.equal(got, want), (
                f"rank {rank} {kind} replay {round_}: max |diff| {(got.float() - want.float()).abs().max().item()}")
        del graph


@pytest.mark.parametrize("kind", ["low_latency", "low_latency_fp8", "worst_case"])
def test_graphed_step_matches_eager(pool, kind):
    pool.run(_graphed_step_matches_eager, kind)
