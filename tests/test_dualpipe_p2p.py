"""Executor transfers with more tensors than one fixed-size header describes, some of them integer (no gradient).

Stages pass ``2 * _HEADER_SLOTS + 1`` tensors (the header spills into a second message) including an int64
counter, under 1F1B (full backward) and ZB1P (split I/W backward), against a single-process reference.
Micro-batches differ in size within and between steps, so transfers take every path: no layout prediction,
a wrong one, a right one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dualpipe import PipelineRunner
from dualpipe.p2p import _HEADER_LEN, _HEADER_SLOTS, Layouts, Transport, decode_header, encode_header
from tests.harness import pool_fixture

pool = pool_fixture(2)
HIDDEN = 4
WIDTH = 2 * _HEADER_SLOTS + 1  # tensors per transfer


class Wide(nn.Module):
    """Takes and returns ``WIDTH`` tensors: float ones, and an int64 step counter at index 1."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(50 + stage)
        self.w = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64) / 2)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(xs) == 1:  # the first stage gets the raw input
            xs = (xs[0], torch.zeros(xs[0].shape[0], dtype=torch.int64)) + tuple(xs[0] * k for k in range(2, WIDTH))
        floats = [x for i, x in enumerate(xs) if i != 1]
        mixed = torch.tanh(sum(floats) @ self.w)
        return tuple(xs[1] + 1 if i == 1 else mixed * (i + 1) + xs[i] for i in range(WIDTH))


def criterion(*args: torch.Tensor) -> torch.Tensor:
    *outs, label = args
    assert torch.equal(outs[1], torch.full_like(outs[1], dist.get_world_size()))
    return sum(((o - label) ** 2).mean() for i, o in enumerate(outs) if i != 1)


def _run(name: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    num_chunks = 2 * world
    runner = PipelineRunner(name, {rank: Wide(rank)})
    gen = torch.Generator().manual_seed(9)
    # Step 1: uneven micro-batches (the first is larger, so the second breaks the layout prediction).
    # Step 2: every transfer predicted from step 1's last, wrongly (more rows). Step 3: predicted rightly.
    for rows in (2 * num_chunks + 1, 3 * num_chunks, 3 * num_chunks):
        x = torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64)
        y = torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64)
        runner.zero_grad(set_to_none=True)
        loss, _ = runner.step(x, num_chunks=num_chunks, criterion=criterion, labels=(y,))
        stages = [Wide(s) for s in range(world)]
        ref = []
        for xc, yc in zip(torch.tensor_split(x, num_chunks), torch.tensor_split(y, num_chunks), strict=True):
            h = (xc,)
            for m in stages:
                h = m(*h)
            value = criterion(*h, yc)
            value.backward()
            ref.append(value.detach())
        grad, ref_grad = runner.stages[str(rank)].w.grad, stages[rank].w.grad
        assert ((grad - ref_grad).norm() <= 1e-12 * ref_grad.norm()).item(), f"rank {rank}: gradient differs"
        if rank == world - 1:
            assert torch.equal(loss, torch.stack(ref))
    return True


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_wide_transfers(pool, name):
    assert all(pool.run(_run, name))


def test_header_roundtrip():
    tensors = [torch.zeros(2, 3), None, torch.zeros((), dtype=torch.int64)] + [
        torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    ] * 7
    specs = [None if t is None else (t.dtype, tuple(t.shape)) for t in tensors]
    header = encode_header(specs, as_predicted=False)
    assert header.numel() == _HEADER_LEN + 2 * (2 + 8)
    count, as_predicted, decoded = decode_header(header[:_HEADER_LEN].tolist())
    assert count == len(tensors) and not as_predicted and decoded == specs[:_HEADER_SLOTS]
    assert decoded[0] == (torch.float32, (2, 3)) and decoded[1] is None and decoded[2] == (torch.int64, ())
    assert encode_header(specs[:3], as_predicted=True).numel() == _HEADER_LEN


def _post_ahead(carry_layouts: bool, max_ahead: int | None):
    """Rank 0 sends rank 1 six transfers on one channel; returns how many receives rank 1 posted up front."""
    rank = dist.get_rank()
    layouts = Layouts()
    spec = [(torch.float64, (3, HIDDEN))]
    if carry_layouts:  # as a pipeline's previous step leaves them, on both sides
        layouts.sent[("F", 0)] = list(spec)
        layouts.received[("F", 0)] = list(spec)
    tids = [("F", 0, m) for m in range(6)]
    receives = [(0, tid) for tid in tids] if rank == 1 else []
    transport = Transport(
        None, torch.device("cpu"), 30.0, rank, receives, lookahead=True, layouts=layouts, max_ahead=max_ahead
    )
    posted_up_front = len(transport._posted)
    for m, tid in enumerate(tids):
        if rank == 0:
            transport.send(1, tid, (torch.full((3, HIDDEN), float(m), dtype=torch.float64),))
        else:
            (got,) = transport.recv(0, tid, f"micro-batch {m}")
            assert torch.equal(got, torch.full((3, HIDDEN), float(m), dtype=torch.float64))
    transport.finish()
    return posted_up_front


def test_receives_posted_when_the_step_starts(pool):
    """With layouts carried from an earlier step every receive (or ``max_ahead``) is posted up front; without, one."""
    assert pool.run(_post_ahead, True, None)[1] == 6
    assert pool.run(_post_ahead, True, 4)[1] == 4
    assert pool.run(_post_ahead, False, None)[1] == 1
