"""The pipeline runtime on gloo CPU ranks, in float64, against a single-process reference.

Losses must be bitwise equal to the reference's, gradients equal to 1e-12 relative, and a
``torch.no_grad()`` step must reproduce the outputs. DualPipe runs on 2 and 4 ranks, DualPipeV on 1, 2 and
4, 1F1B and ZB1P through the same executor.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dualpipe import DualPipe, DualPipeV, PipelineRunner
from tests.harness import pool_fixture

pool = pool_fixture(1, 2, 4)
HIDDEN = 8


class Stage(nn.Module):
    """One pipeline stage: a small residual MLP (deterministic init from the stage id)."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1000 + stage)
        self.w1 = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5)
        self.w2 = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x @ self.w1) @ self.w2


class HookedStage(Stage):
    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            torch.autograd.backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return ((out - label) ** 2).mean()


def _data(batch: int, seed: int = 0, seq: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, HIDDEN) if seq is None else (batch, seq, HIDDEN)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)


def _reference(num_stages: int, x: torch.Tensor, y: torch.Tensor, num_chunks: int, stage_cls=Stage):
    stages = [stage_cls(s) for s in range(num_stages)]
    losses, outs = [], []
    for xc, yc in zip(torch.tensor_split(x, num_chunks), torch.tensor_split(y, num_chunks), strict=True):
        h = xc
        for m in stages:
            h = m(h)
        loss = criterion(h, yc)
        loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    return torch.stack(losses), torch.cat(outs), stages


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).norm() <= 1e-12 * b.norm().clamp_min(1e-300)).item())


def _dualpipev(num_chunks: int, hooked: bool = False):
    rank, world = dist.get_rank(), dist.get_world_size()
    cls = HookedStage if hooked else Stage
    HookedStage.calls = 0
    pipe = DualPipeV((cls(rank), cls(2 * world - 1 - rank)))
    x, y = _data(4 * num_chunks)
    loss, out = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=(y,), return_outputs=True)
    ref_loss, ref_out, ref_stages = _reference(2 * world, x, y, num_chunks)
    mine = {rank: pipe.stages[str(rank)], 2 * world - 1 - rank: pipe.stages[str(2 * world - 1 - rank)]}
    for s, m in mine.items():
        for p, q in zip(m.parameters(), ref_stages[s].parameters(), strict=True):
            assert _close(p.grad, q.grad), f"rank {rank} stage {s}: gradient differs"
    if rank == 0:
        assert torch.equal(loss, ref_loss), (loss, ref_loss)
        assert torch.equal(out, ref_out)
    else:
        assert loss is None and out is None
    with torch.no_grad():
        _, again = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=(y,), return_outputs=True)
    if rank == 0:
        assert torch.equal(again, ref_out)
    return HookedStage.calls


@pytest.mark.parametrize("num_chunks", [0, 2], ids=["chunks2R", "chunks2R+2"])
def test_dualpipev_matches_reference(pool, num_chunks):
    world = pool.world_size
    pool.run(_dualpipev, 2 * world + num_chunks)


def test_overlap_hook_is_called(pool):
    world = pool.world_size
    calls = pool.run(_dualpipev, 2 * world + 2, True)
    assert sum(calls) > 0 or world == 1


def _dualpipe(num_chunks: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = DualPipe((Stage(rank), Stage(world - 1 - rank)))
    half = num_chunks // 2
    x0, y0 = _data(4 * half, seed=1)  # chain 0: fed on rank 0, loss on rank R-1
    x1, y1 = _data(4 * half, seed=2)  # chain 1: fed on rank R-1, loss on rank 0
    inputs = (x0,) if rank == 0 else (x1,) if rank == world - 1 else ()
    labels = (y1,) if rank == 0 else (y0,) if rank == world - 1 else ()
    loss, out = pipe.step(*inputs, num_chunks=num_chunks, criterion=criterion, labels=labels, return_outputs=True, sync_grads=True)
    ref_loss0, ref_out0, ref = _reference(world, x0, y0, half)
    ref_loss1, ref_out1, _ = _reference(world, x1, y1, half)  # accumulates into fresh stages; sum below
    ref_b = [Stage(s) for s in range(world)]
    _reference_into(ref_b, x0, y0, half)
    _reference_into(ref_b, x1, y1, half)
    for module, s in ((pipe.module_pair[0], rank), (pipe.module_pair[1], world - 1 - rank)):
        for p, q in zip(module.parameters(), ref_b[s].parameters(), strict=True):
            assert _close(p.grad, q.grad), f"rank {rank} stage {s}: mirrored gradient differs"
    if rank == 0:
        assert torch.equal(loss, ref_loss1) and torch.equal(out, ref_out1)
    if rank == world - 1:
        assert torch.equal(loss, ref_loss0) and torch.equal(out, ref_out0)
    return True


def _reference_into(stages, x, y, num_chunks):
    for xc, yc in zip(torch.tensor_split(x, num_chunks), torch.tensor_split(y, num_chunks), strict=True):
        h = xc
        for m in stages:
            h = m(h)
        criterion(h, yc).backward()


def test_dualpipe_matches_reference(pool):
    world = pool.world_size
    if world % 2:
        pytest.skip("DualPipe needs an even rank count")
    assert all(pool.run(_dualpipe, 2 * world))


def _linear_plan(name: str, num_chunks: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    runner = PipelineRunner(name, {rank: Stage(rank)})
    x, y = _data(3 * num_chunks, seed=3)
    loss, out = runner.step(x, num_chunks=num_chunks, criterion=criterion, labels=(y,), return_outputs=True)
    ref_loss, ref_out, ref = _reference(world, x, y, num_chunks)
    for p, q in zip(runner.stages[str(rank)].parameters(), ref[rank].parameters(), strict=True):
        assert _close(p.grad, q.grad), f"rank {rank}: {name} gradient differs"
    if rank == world - 1:
        assert torch.equal(loss, ref_loss) and torch.equal(out, ref_out)
    return True


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_linear_plans_through_the_executor(pool, name):
    assert all(pool.run(_linear_plan, name, 2 * pool.world_size))


def _variable_lengths():
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = DualPipeV((Stage(rank), Stage(2 * world - 1 - rank)), batch_dim=1)
    num_chunks = 2 * world
    # Sequence dimension 1 is cut unevenly (11 positions into 2R chunks): micro-batches differ in shape.
    x, y = _data(3, seed=4, seq=2 * world + 3)
    loss, out = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=(y,), return_outputs=True)
    if rank == 0:
        stages = [Stage(s) for s in range(2 * world)]
        ref = []
        for xc, yc in zip(torch.tensor_split(x, num_chunks, dim=1), torch.tensor_split(y, num_chunks, dim=1), strict=True):
            h, yc = xc.contiguous(), yc.contiguous()
            for m in stages:
                h = m(h)
            ref.append(criterion(h, yc).detach())
        assert torch.equal(loss, torch.stack(ref))
    return True


def test_variable_micro_batch_shapes(pool):
    assert all(pool.run(_variable_lengths))


def _mismatched_chunks():
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = DualPipeV((Stage(rank), Stage(2 * world - 1 - rank)), timeout_s=20)
    x, y = _data(8 * world)
    try:
        pipe.step(x, num_chunks=2 * world + 2 * rank, criterion=criterion, labels=(y,))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_ranks_disagreeing_on_num_chunks_raise_everywhere(pool):
    if pool.world_size == 1:
        pytest.skip("one rank cannot disagree with itself")
    messages = pool.run(_mismatched_chunks)
    assert all("num_chunks differs between ranks" in m for m in messages), messages
