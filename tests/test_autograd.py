"""Autograd: dispatch's backward is a combine, combine's backward a cached dispatch; gradcheck in float64."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_comm import Buffer
from moe_comm import functional as F
from tests.harness import pool_fixture

pool = pool_fixture(1, 2, 3)


def _routing(rank: int, world: int, tokens: int, k: int, experts_per_rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    experts = experts_per_rank * world
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    idx[0, 0] = -1
    return idx, gen


def _gradcheck_roundtrip():
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", num_experts=2 * world)
    idx, gen = _routing(rank, world, tokens=3, k=2, experts_per_rank=2)
    # Equal shapes on every rank keep gradcheck's forward/backward calls in lockstep.
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float32, generator=gen)
    bias = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def roundtrip(x_TH, bias_TH):
        recv_x, recv_idx, recv_w, handle, _ = F.dispatch(buf, x_TH, idx, w)
        scale = (recv_w.double().sum(dim=1, keepdim=True) + 1.0) * (rank + 1)
        return F.combine(buf, (recv_x * scale).sin(), handle, bias=bias_TH)

    ok = torch.autograd.gradcheck(roundtrip, (x, bias), eps=1e-6, atol=1e-8, rtol=1e-7)
    return ok


def test_gradcheck_float64(pool):
    assert all(pool.run(_gradcheck_roundtrip))


def _weights_gradient():
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(backend="torch", num_experts=3 * world)
    idx, gen = _routing(rank, world, tokens=5, k=3, experts_per_rank=3)
    x = torch.randn(5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(5, 3, dtype=torch.float32, generator=gen, requires_grad=True)
    recv_x, recv_idx, recv_w, handle, _ = F.dispatch(buf, x, idx, w)
    out = F.combine(buf, recv_x * recv_w.sum(dim=1, keepdim=True).double(), handle)
    # Every rank a token reaches multiplies by the weights of its own experts: the sum is x * sum_k w_k.
    expected = x.detach() * torch.where(idx >= 0, w.detach(), 0.0).sum(dim=1, keepdim=True).double()
    assert torch.allclose(out.detach(), expected, rtol=1e-6)
    out.sum().backward()
    valid = idx >= 0
    grad_w = torch.where(valid, x.detach().sum(dim=1, keepdim=True).float().expand_as(w), 0.0)
    assert torch.allclose(w.grad, grad_w, rtol=1e-5, atol=1e-6)
    grad_x = torch.where(valid, w.detach(), 0.0).sum(dim=1, keepdim=True).double().expand_as(x)
    assert torch.allclose(x.grad, grad_x, rtol=1e-6)
    return True


def test_gradients_of_x_and_weights(pool):
    assert all(pool.run(_weights_gradient))
