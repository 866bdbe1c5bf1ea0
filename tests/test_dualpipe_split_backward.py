"""dualpipe.split_backward: an I pass then a W pass give the gradients of one full backward, bitwise.

Each case builds a stage (float64), runs a full ``backward`` for the reference gradients, then the same
forward split into :func:`input_backward` and :func:`weight_backward`, and compares input and parameter
gradients exactly. Graph shapes: linear layers, a weight used twice with a parameterised node between the
uses, a multi-output node, a parameter-only output, an output that depends on no input, a custom autograd
function, a checkpointed stage, and a W that must not re-run the input side; a checkpointed region is
recomputed once per pass. Then, through the pipeline on 2 ranks, a model that defers weight gradients through
``WeightGradStore`` (one on the input path, one on a parameter alone), each gradient counted once, and
checkpointed stages.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from dualpipe import DualPipeV, PipelineRunner, WeightGradStore
from dualpipe.split_backward import input_backward, weight_backward
from tests.harness import pool_fixture

pool = pool_fixture(2)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12, dtype=torch.float64)
        self.b = nn.Linear(12, 6, dtype=torch.float64)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(x)))


class _Tied(nn.Module):
    """One weight used twice, a LayerNorm (its own parameters) between the two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64) / 3)
        self.norm = nn.LayerNorm(6, dtype=torch.float64)

    def forward(self, x):
        return self.norm(torch.tanh(x @ self.w)) @ self.w


class _Split(nn.Module):
    """A multi-output node (chunk) on the input path, two outputs, one of them also depending on a parameter alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64) / 3)
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(2, dtype=torch.float64))

    def forward(self, x):
        left, right = (x @ self.w).chunk(2, dim=-1)
        return left * self.scale, torch.sin(right) + self.scale.exp()


class _ParamOnly(nn.Module):
    """A second output that does not depend on the input at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6, dtype=torch.float64)
        self.bias = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x), self.bias * 3.0


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x @ w) ** 2

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        inner = 2 * (x @ w) * grad
        return inner @ w.T, x.T @ inner


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64) / 3)
        self.lin = nn.Linear(6, 6, dtype=torch.float64)

    def forward(self, x):
        return self.lin(_Square.apply(x, self.w))


class _Checkpointed(nn.Module):
    """``_Tied`` under non-reentrant activation checkpointing: its saved tensors are recomputed on unpack."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Tied()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def _run(module: nn.Module, split: bool, last: bool):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    if last:
        roots = [sum((o**2).mean() for o in outs)]
        grads = [None]
    else:
        roots = list(outs)
        grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    params = [p for p in module.parameters()]
    if not split:
        torch.autograd.backward(roots, grads)
        return x.grad, [p.grad for p in params]
    before = [None if p.grad is None else p.grad.clone() for p in params]
    (dx,), work = input_backward(roots, grads, [x], params)
    for p, b in zip(params, before, strict=True):  # the I pass must not touch parameter gradients
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)
    del roots, outs, out  # the W must not need the outputs
    weight_backward(work)
    return dx, [p.grad for p in params]


@pytest.mark.parametrize("cls", [_Mlp, _Tied, _Split, _ParamOnly, _Custom, _Checkpointed])
@pytest.mark.parametrize("last", [False, True], ids=["middle", "last"])
def test_split_matches_full_backward(cls, last) -> None:
    torch.manual_seed(0)
    module = cls()
    ref_dx, ref_grads = _run(module, split=False, last=last)
    module.zero_grad(set_to_none=True)
    dx, grads = _run(module, split=True, last=last)
    assert torch.equal(dx, ref_dx)
    for g, ref in zip(grads, ref_grads, strict=True):
        if ref is None:
            assert g is None
        else:
            assert g is not None and torch.equal(g, ref)


def test_accumulates_across_microbatches() -> None:
    torch.manual_seed(0)
    module = _Mlp()
    for _ in range(2):
        _run(module, split=False, last=False)
    ref = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    for _ in range(2):
        _run(module, split=True, last=False)
    for p, r in zip(module.parameters(), ref, strict=True):
        assert torch.equal(p.grad, r)


def test_weight_pass_skips_the_input_side() -> None:
    """Count node executions: the W runs no node that only feeds the input gradient."""
    torch.manual_seed(0)
    module = _Mlp()
    x = torch.randn(4, 6, dtype=torch.float64).requires_grad_(True)
    out = module(x)
    gelu = out.grad_fn.next_functions[1][0].next_functions[1][0]  # AddBackward -> AddmmBackward -> GeluBackward
    calls = []
    gelu.register_prehook(lambda grads: calls.append(1))
    (_,), work = input_backward([out], [torch.ones_like(out)], [x], list(module.parameters()))
    assert len(calls) == 1
    weight_backward(work)
    assert len(calls) == 1, "the W pass re-ran the GELU backward (input side)"
    assert all(p.grad is not None for p in module.parameters())


# --- a model deferring weight gradients through WeightGradStore (DeepSeek's interface), on 2 ranks ---------


class _StoreLinear(torch.autograd.Function):
    """``x @ w`` whose weight gradient is deferred to the W when a split backward runs."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors

        def weight_grad():
            g = x.T @ grad
            w.grad = g if w.grad is None else w.grad + g

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad @ w.T, None


class _StoreDouble(torch.autograd.Function):
    """``2 * p`` of a parameter alone (the parameter side: its backward first runs in the W)."""

    @staticmethod
    def forward(ctx, p):
        ctx.param = p
        return p * 2

    @staticmethod
    def backward(ctx, grad):
        p = ctx.param

        def weight_grad():
            p.grad = 2 * grad if p.grad is None else p.grad + 2 * grad

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return None


class _StoreStage(nn.Module):
    def __init__(self, stage: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(300 + stage)
        self.w1 = nn.Parameter(torch.randn(6, 6, generator=gen, dtype=torch.float64) / 3)
        self.w2 = nn.Parameter(torch.randn(6, 6, generator=gen, dtype=torch.float64) / 3)
        self.bias = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x + torch.tanh(_StoreLinear.apply(x, self.w1)) @ self.w2 + _StoreDouble.apply(self.bias)


class _CheckpointedStage(nn.Module):
    """Three linear layers under non-reentrant activation checkpointing."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        torch.manual_seed(400 + stage)
        self.layers = nn.Sequential(*(nn.Linear(6, 6, dtype=torch.float64) for _ in range(3)))

    def forward(self, x):
        return x + torch.utils.checkpoint.checkpoint(self.layers, x, use_reentrant=False)


_STAGES = {"store": _StoreStage, "checkpointed": _CheckpointedStage}


def _store_criterion(out, label):
    return ((out - label) ** 2).mean()


def _pipeline_matches_reference(name: str, kind: str):
    stage_cls = _STAGES[kind]
    rank, world = dist.get_rank(), dist.get_world_size()
    num_chunks = 2 * world
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2 * num_chunks, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(2 * num_chunks, 6, generator=gen, dtype=torch.float64)
    if name == "dualpipev":
        stage_ids = [rank, 2 * world - 1 - rank]
        runner = DualPipeV((stage_cls(stage_ids[0]), stage_cls(stage_ids[1])))
        num_stages = 2 * world
    else:
        stage_ids = [rank]
        runner = PipelineRunner(name, {rank: stage_cls(rank)})
        num_stages = world
    loss, _ = runner.step(x, num_chunks=num_chunks, criterion=_store_criterion, labels=(y,))
    stages = [stage_cls(s) for s in range(num_stages)]
    ref = []
    for xc, yc in zip(torch.tensor_split(x, num_chunks), torch.tensor_split(y, num_chunks), strict=True):
        h = xc
        for m in stages:
            h = m(h)
        value = _store_criterion(h, yc)
        value.backward()
        ref.append(value.detach())
    for s in stage_ids:
        for p, q in zip(runner.stages[str(s)].parameters(), stages[s].parameters(), strict=True):
            assert ((p.grad - q.grad).norm() <= 1e-12 * q.grad.norm()).item(), (
                f"rank {rank} stage {s}: gradient differs"
            )
    if loss is not None:
        assert torch.equal(loss, torch.stack(ref))
    return True


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipev"])
def test_weight_grad_store_closures_count_once(pool, name):
    assert all(pool.run(_pipeline_matches_reference, name, "store"))


@pytest.mark.parametrize("name", ["zb1p", "dualpipev"])
def test_checkpointed_stages_through_the_pipeline(pool, name):
    assert all(pool.run(_pipeline_matches_reference, name, "checkpointed"))


class _CountedLayers(nn.Module):
    """Four linear layers (four parameter groups) that count their forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(6, 6, dtype=torch.float64) for _ in range(4)))
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return self.layers(x)


@pytest.mark.skipif(not hasattr(torch.utils.checkpoint, "GraphExecGroup"), reason="PyTorch without GraphExecGroup")
def test_checkpointed_region_recomputed_once_per_pass() -> None:
    torch.manual_seed(0)
    inner = _CountedLayers()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
    grad = torch.randn_like(out)
    (dx,), work = input_backward([out], [grad], [x], list(inner.parameters()))
    assert inner.runs == 2, "the I pass should recompute the region once"
    assert len(work.groups) == 4
    weight_backward(work)
    assert inner.runs == 3, f"the W pass recomputed the region {inner.runs - 2} times, not once"
    split = [p.grad.clone() for p in inner.parameters()]
    inner.zero_grad(set_to_none=True)
    ref_x = x.detach().clone().requires_grad_(True)
    inner(ref_x).backward(grad)
    assert torch.equal(dx, ref_x.grad)
    assert all(torch.equal(a, p.grad) for a, p in zip(split, inner.parameters(), strict=True))
