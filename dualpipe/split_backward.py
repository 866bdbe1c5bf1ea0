"""Split backward: input gradients now (``I``), weight gradients later (``W``) without re-running the input side.

A stage's backward graph has two sides. The *input side* is every node on a path from the roots (the loss or
the stage outputs) to the stage inputs: the ``I`` pass must run all of it. Everything else leads only to
parameters. The nodes where the two meet, input-side nodes with an edge into the parameter side, are the
*boundary*: a linear layer's ``AddmmBackward`` is one (its input gradient goes on down the input side, its
weight and bias gradients off to the parameters).

:func:`input_backward` runs the ``I`` pass (``torch.autograd.grad`` on the inputs, graph kept) with a pre-hook
on each boundary node that records the gradient arriving there. :func:`weight_backward` (the ``W``) then
starts the engine at those boundary nodes with the recorded gradients and only the parameters as targets, so
only the parameter side runs again: the input side is not traversed twice. Each node computes exactly what it
computes in a full backward from exactly the same incoming gradients, so the gradients are bitwise those of an
unsplit backward.

Parameters are grouped by the boundary they hang from (parameters sharing a boundary node, or a parameter-side
node, share a group) and each group is one engine call, because a single call seeded at every boundary node
would also propagate from one boundary node down the input side into the next, which is the re-traversal the
split avoids. When a group's boundary nodes lie on one path (a weight used twice, say), the engine does cross
the input side between them; a pre-hook then pins each boundary node's incoming gradient to the recorded value
so nothing is counted twice. A root that does not depend on the inputs (a parameter-only output) is a seed of
its group with its own output gradient.

Activation checkpointing: regions under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` split
exactly (tested bitwise). Their forward is recomputed when an engine call first unpacks their saved tensors:
once in the ``I``, and once in the ``W``, whose calls share one recomputation under PyTorch's
``GraphExecGroup`` (where PyTorch has it), except where a group has several boundary nodes (a weight used twice),
whose call may run nodes of other groups: then each call of the ``W`` recomputes. Reentrant checkpointing
cannot be split at all: PyTorch refuses ``torch.autograd.grad`` through it and says so.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightWork", "input_backward", "weight_backward"]

_Grads = tuple[torch.Tensor | None, ...]


@dataclass
class _Group:
    params: list[torch.Tensor] = field(default_factory=list)
    boundary: list[Node] = field(default_factory=list)  # input-side nodes; their incoming grads are recorded in I
    roots: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)  # input-independent roots


@dataclass
class WeightWork:
    """What an ``I`` pass leaves for its ``W``: parameter groups and the gradients recorded at their boundary."""

    groups: list[_Group]
    recorded: dict[Node, _Grads]


def _node(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node


def _reverse_edges(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from ``roots`` -> the nodes with an edge into it (its consumers in the forward)."""
    parents: dict[Node, list[Node]] = {n: [] for n in roots}
    queue = deque(parents)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in parents:
                parents[child] = []
                queue.append(child)
            parents[child].append(node)
    return parents


def _input_side(parents: dict[Node, list[Node]], inputs: Sequence[Node]) -> set[Node]:
    """Nodes with a path to one of ``inputs`` (the inputs included)."""
    side = {n for n in inputs if n in parents}
    queue = deque(side)
    while queue:
        for parent in parents[queue.popleft()]:
            if parent not in side:
                side.add(parent)
                queue.append(parent)
    return side


def _plan_groups(
    roots: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> list[_Group]:
    root_edges = [get_gradient_edge(r) for r in roots]
    parents = _reverse_edges([e.node for e in root_edges])
    input_side = _input_side(parents, [_node(t) for t in inputs])
    root_seeds: dict[Node, list[tuple[GradientEdge, torch.Tensor]]] = {}
    for edge, root, grad in zip(root_edges, roots, grads, strict=True):
        if edge.node not in input_side:
            root_seeds.setdefault(edge.node, []).append((edge, torch.ones_like(root) if grad is None else grad))

    # Walk up from each parameter through the parameter side; the seeds it meets are the input-side nodes
    # (boundary) and the input-independent roots. Parameters meeting a common seed share a group (union-find).
    owner: dict[Node, int] = {}  # seed -> index into `found`
    found: list[tuple[list[torch.Tensor], list[Node]]] = []
    link: list[int] = []

    def find(i: int) -> int:
        while link[i] != i:
            link[i] = link[link[i]]
            i = link[i]
        return i

    for param in params:
        start = _node(param)
        if start not in parents:
            continue  # unused by this micro-batch's graph: no gradient, as in a full backward
        seen, seeds, queue = {start}, [], deque([start])
        while queue:
            node = queue.popleft()
            if node in root_seeds:
                seeds.append(node)
            for parent in parents[node]:
                if parent in seen:
                    continue
                seen.add(parent)
                if parent in input_side:
                    seeds.append(parent)
                else:
                    queue.append(parent)
        index = len(found)
        found.append(([param], seeds))
        link.append(index)
        for seed in seeds:
            if seed in owner:
                a, b = find(owner[seed]), find(index)
                link[max(a, b)] = min(a, b)
            else:
                owner[seed] = index

    merged: dict[int, _Group] = {}
    for index, (params_here, _) in enumerate(found):
        merged.setdefault(find(index), _Group()).params.extend(params_here)
    for seed, index in owner.items():
        group = merged[find(index)]
        if seed in root_seeds:
            group.roots.extend(root_seeds[seed])
        else:
            group.boundary.append(seed)
    return [merged[i] for i in sorted(merged)]


def input_backward(
    roots: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[tuple[torch.Tensor | None, ...], WeightWork]:
    """The ``I`` pass: gradients of ``roots`` (seeded with ``grads``) w.r.t. ``inputs``, which must be non-empty.

    Returns the input gradients (``None`` where unused) and the :class:`WeightWork` for :func:`weight_backward`.
    Parameter gradients are not touched.
    """
    groups = _plan_groups(roots, grads, inputs, params)
    recorded: dict[Node, _Grads] = {}

    def recorder(node: Node):
        def hook(grad_outputs: _Grads) -> None:
            recorded[node] = tuple(grad_outputs)

        return hook

    handles = [node.register_prehook(recorder(node)) for group in groups for node in group.boundary]
    try:
        computed = torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return computed, WeightWork(groups, recorded)


def _may_cross_input_side(group: _Group) -> bool:
    """Whether the group's W call may run input-side nodes: from one of its boundary nodes to another."""
    return len(group.boundary) > 1


def _one_recomputation(groups: Sequence[_Group]) -> contextlib.AbstractContextManager[object]:
    """A context in which the W's engine calls recompute each checkpointed region at most once.

    ``torch.utils.checkpoint.GraphExecGroup`` (where PyTorch has it: 2.13 does) makes backward calls under it
    share one recomputation, provided no two of them run the same node (each saved tensor is unpacked once).
    A group with one boundary node runs that node and its parameter side only, which no other group shares; a
    group that may cross the input side may run other groups' nodes, so then each call recomputes.
    """
    exec_group = getattr(torch.utils.checkpoint, "GraphExecGroup", None)
    if exec_group is None or any(_may_cross_input_side(group) for group in groups):
        return contextlib.nullcontext()
    if exec_group._get_current_group() is not None:  # the caller's own (they do not nest)
        return contextlib.nullcontext()
    return exec_group()


def weight_backward(work: WeightWork) -> None:
    """The ``W`` pass: accumulate the parameters' gradients into ``.grad`` from what ``I`` recorded."""
    calls = []
    for group in work.groups:
        edges: list[GradientEdge] = []
        seeds: list[torch.Tensor] = []
        for node in group.boundary:
            for i, grad in enumerate(work.recorded.get(node, ())):
                if grad is not None:
                    edges.append(GradientEdge(node, i))
                    seeds.append(grad)
        for edge, grad in group.roots:
            edges.append(edge)
            seeds.append(grad)
        if edges:
            calls.append((group, edges, seeds))
    with _one_recomputation(work.groups):
        for n, (group, edges, seeds) in enumerate(calls):
            pins = []
            if _may_cross_input_side(group):
                for node in group.boundary:
                    if node in work.recorded:
                        pins.append(node.register_prehook(lambda _grads, kept=work.recorded[node]: kept))
            try:
                torch.autograd.backward(edges, seeds, retain_graph=n < len(calls) - 1, inputs=group.params)
            finally:
                for pin in pins:
                    pin.remove()
    work.groups.clear()
    work.recorded.clear()
