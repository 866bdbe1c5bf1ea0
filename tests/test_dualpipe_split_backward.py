"""dualpipe.split_backward: an I pass then a W pass give the gradients of one full backward, bitwise.

Each case builds a stage (float64), runs a full ``backward`` for the reference gradients, then the same
forward split into :func:`input_backward` and :func:`weight_backward`, and compares input and parameter
gradients exactly. Graph shapes: linear layers, a weight used twice with a parameterised node between the
uses, a multi-output node, a parameter-only output, an output that depends on no input, a custom autograd
function, and a W that must not re-run the input side.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualpipe.split_backward import input_backward, weight_backward


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


@pytest.mark.parametrize("cls", [_Mlp, _Tied, _Split, _ParamOnly, _Custom])
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
