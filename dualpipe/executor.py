"""Run one rank's share of a :class:`~dualpipe.ir.Schedule`: the executor behind every pipeline module.

The executor walks the rank's lowered action list (:func:`dualpipe.validate.lower_to_p2p`) in order:

- ``F``: run the stage module on its input (the chain's input chunk on a chain's first stage, else the
  received activation); the last stage of a chain applies the criterion to get the micro-batch's loss.
- ``B``: full backward of the stage (from the loss, or from the received output gradient).
- ``I``: input-gradient backward only (``torch.autograd.grad`` with the graph kept), recording the gradients
  that reach the nodes where parameters hang off the input path; ``W``: the deferred weight-gradient backward,
  which restarts the engine from those recorded gradients so only the parameter side of the graph runs again
  (:mod:`dualpipe.split_backward`), plus any closures the model queued in this step's :class:`WeightGradStore`.
- ``OVERLAP_F_B``: the model's ``overlapped_forward_backward`` hook when the stage module's class defines
  it (DeepSeek's signature), otherwise the forward then the backward.
- ``SEND_*``/``RECV_*``: point-to-point transfers (:mod:`dualpipe.p2p`). Every transfer is one fixed-size
  int64 header (tensor count, then per tensor its dtype and shape) followed by the tensors, so micro-batches
  may differ in shape (variable sequence length) with no global shape list; a transfer of the same layout as
  predicted (the channel's last before the step, kept across a pipeline's steps) is one message, header and
  payload together. Sends are asynchronous and waited at the end of the step; on CPU (gloo) receives are
  posted ahead of their ``RECV`` (from a channel's second step on, all of them when the step starts), and
  waited there, bounded by the timeout. Ranks post messages in the plan's order, which the validator proved
  consistent with per-peer FIFO matching (NCCL matches same-peer messages in order).

A failure inside an action re-raises with the schedule's rank x step grid, the failing step marked.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.ir import Action, Kind, Schedule, ScheduleError
from dualpipe.p2p import Layouts, TransferId, Transport
from dualpipe.split_backward import WeightWork, input_backward, weight_backward
from dualpipe.validate import lower_to_p2p

__all__ = ["Executor", "StepInputs", "WeightGradStore"]

_active_store: contextvars.ContextVar[WeightGradStore | None] = contextvars.ContextVar("dualpipe_weight_grad_store", default=None)


class WeightGradStore:
    """Deferred weight-gradient closures, scoped to one pipeline object (no state shared between models).

    Compatible with DeepSeek's class-level interface: a model's backward may check
    ``WeightGradStore.enabled`` and call ``WeightGradStore.put(fn)``; these class methods reach the store of
    the pipeline step that is running (a context variable), so two models never see each other's closures.
    ``W`` actions run the closures queued by the matching ``I``.

    The ``W`` also runs the autograd graph's parameter side again, which re-enters the backward of every
    node that hangs parameters off the input path, including a model's custom functions that queued a
    closure in the ``I``: during the ``W`` the store stays enabled, and a closure put by a node that already
    queued one in the matching ``I`` is dropped (that ``I``'s closure covers it), while one put by a node the
    ``I`` never ran is computed at once. Nodes are told apart by ``torch._C._current_autograd_node()``.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[list[Callable[[], None]], set[object]]] = []  # per I: closures, nodes that put
        self._pending: list[Callable[[], None]] = []
        self._pending_nodes: set[object] = set()
        self._enabled = False
        self._replaying: set[object] | None = None  # during a W: the nodes whose closures its I queued

    # --- DeepSeek-compatible class-level facade --------------------------------------------------
    @classmethod
    def _current(cls) -> WeightGradStore | None:
        return _active_store.get()

    @classmethod
    def is_enabled(cls) -> bool:
        store = cls._current()
        return bool(store is not None and (store._enabled or store._replaying is not None))

    @classmethod
    def put(cls, fn: Callable[[], None]) -> None:
        """Queue ``fn`` (a weight-gradient computation) for the running step's next ``W``."""
        store = cls._current()
        if store is not None and store._replaying is not None:  # inside a W
            if _current_node() not in store._replaying:
                fn()  # a node its I never ran: nothing queued covers it
            return
        if store is None or not store._enabled:
            fn()  # no split backward running: compute the weight gradient now
            return
        store._pending.append(fn)
        node = _current_node()
        if node is not None:
            store._pending_nodes.add(node)

    # --- used by the executor ----------------------------------------------------------------------
    def begin_input_backward(self) -> None:
        self._enabled = True

    def end_input_backward(self) -> None:
        self._enabled = False
        self._queue.append((self._pending, self._pending_nodes))
        self._pending = []
        self._pending_nodes = set()

    def begin_weight_backward(self) -> None:
        """Enter the oldest I's W (see the class docstring); :meth:`pop` ends it."""
        self._replaying = self._queue[0][1] if self._queue else set()

    def pop(self) -> None:
        """Run the closures of the oldest input-gradient backward."""
        self._replaying = None
        if self._queue:
            for fn in self._queue.pop(0)[0]:
                fn()

    def clear(self) -> None:
        self._queue.clear()
        self._pending.clear()
        self._pending_nodes.clear()
        self._enabled = False
        self._replaying = None


def _current_node() -> object | None:
    """The autograd node whose backward is running, if any."""
    return torch._C._current_autograd_node()


class _EnabledDescriptor:
    def __get__(self, obj: object, owner: type) -> bool:
        return WeightGradStore.is_enabled()


WeightGradStore.enabled = _EnabledDescriptor()  # type: ignore[attr-defined]


@dataclass
class StepInputs:
    """What one rank feeds a step.

    Attributes:
        chunks: per chain whose first stage is on this rank, its micro-batch inputs (each a tuple of tensors).
        labels: per chain whose last stage is on this rank, its micro-batch labels (each a tuple of tensors).
        criterion: ``criterion(*outputs, *labels) -> scalar loss``, used on chains' last stages.
    """

    chunks: dict[int, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    labels: dict[int, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    criterion: Callable[..., torch.Tensor] | None = None


@dataclass
class _Slot:
    """Per (stage, micro-batch) state between its forward and its backward."""

    microbatch: int = -1
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[torch.Tensor, ...] = ()
    loss: torch.Tensor | None = None
    output_grads: tuple[torch.Tensor | None, ...] | None = None
    input_grads: tuple[torch.Tensor | None, ...] = ()
    weight_pending: bool = False
    weight_work: WeightWork | None = None  # what the I recorded for the W (None: the W runs a full weight backward)


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(value)


class Executor:
    """Runs one rank's lowered plan over ``stage_modules`` and ``group``.

    Args:
        schedule: the whole plan (every rank's actions); it is lowered here.
        rank: this process's pipeline rank (index into the plan).
        stage_modules: stage id -> module for every stage this rank holds.
        group: process group of the pipeline ranks; ``peer_ranks[r]`` maps plan rank r to a rank of ``group``.
        timeout_s: bound on every receive.
        lowered: ``lower_to_p2p(schedule)`` when the caller already has it.
        layouts: transfer layout predictions kept across steps (:class:`dualpipe.p2p.Layouts`).
    """

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stage_modules: dict[int, nn.Module],
        group: dist.ProcessGroup | None,
        peer_ranks: Sequence[int],
        timeout_s: float = 300.0,
        lowered: Schedule | None = None,
        layouts: Layouts | None = None,
    ) -> None:
        self.schedule = schedule
        if lowered is None:
            lowered = lower_to_p2p(schedule) if schedule.topology.num_ranks > 1 else schedule
        self.lowered = lowered
        self.layouts = layouts
        self.rank = rank
        self.topology = schedule.topology
        self.stage_modules = stage_modules
        self.group = group
        self.peer_ranks = list(peer_ranks)
        self.timeout_s = timeout_s
        self.store = WeightGradStore()
        self._device = next((p.device for m in stage_modules.values() for p in m.parameters()), torch.device("cpu"))

    # ----------------------------------------------------------------------------------------------
    def run(self, inputs: StepInputs, *, forward_only: bool = False) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[tuple[torch.Tensor, ...]]]]:
        """Execute this rank's actions.

        Returns:
            ``(losses, outputs)``: per chain whose last stage is here, the detached per-micro-batch losses
            (when a criterion was given) and the detached last-stage outputs.
        """
        self._slots: dict[tuple[int, int], _Slot] = {}
        self._inputs = inputs
        self._losses: dict[int, dict[int, torch.Tensor]] = {}
        self._outputs: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        self.store.clear()
        token = _active_store.set(self.store)
        actions = self.lowered.ranks[self.rank]
        self._transport = Transport(
            self.group,
            self._device,
            self.timeout_s,
            self.rank,
            self._receives(actions, forward_only),
            lookahead=self._device.type != "cuda",
            layouts=self.layouts,
        )
        try:
            for step, action in enumerate(actions):
                try:
                    self._run_action(action, forward_only)
                except ScheduleError:
                    raise
                except Exception as exc:
                    raise RuntimeError(
                        f"dualpipe rank {self.rank}: action {action} (step {step}) failed: {type(exc).__name__}: {exc}\n"
                        + self.lowered.format_grid(mark=(self.rank, step))
                    ) from exc
            self._transport.finish()
        finally:
            _active_store.reset(token)
        losses = {c: [v[mb] for mb in sorted(v)] for c, v in self._losses.items()}
        outputs = {c: [v[mb] for mb in sorted(v)] for c, v in self._outputs.items()}
        return losses, outputs

    # ----------------------------------------------------------------------------------------------
    def _slot(self, stage: int, mb: int) -> _Slot:
        return self._slots.setdefault((stage, mb), _Slot(microbatch=mb))

    @staticmethod
    def _mb_of(slot: _Slot) -> int:
        return slot.microbatch

    def _run_action(self, action: Action, forward_only: bool) -> None:
        kind = action.kind
        if kind is Kind.OVERLAP_F_B:
            fwd, bwd = action.sub_actions
            if forward_only:
                self._forward(fwd)
            elif bwd.kind is Kind.B and self._has_overlap_hook(fwd, bwd):
                self._overlapped(fwd, bwd)
            else:
                self._forward(fwd)
                self._backward(bwd)
            return
        if kind is Kind.F:
            self._forward(action)
        elif kind in (Kind.B, Kind.I, Kind.W):
            if not forward_only:
                self._backward(action)
        elif kind is Kind.SEND_F:
            self._send("F", action, self._slot(action.stage, action.microbatch).outputs)
        elif kind is Kind.RECV_F:
            received = self._recv("F", action)
            self._slot(action.stage, action.microbatch).inputs = tuple(
                t.requires_grad_(t.is_floating_point() and not forward_only) for t in received
            )
        elif kind is Kind.SEND_B:
            if not forward_only:
                self._send("B", action, self._slot(action.stage, action.microbatch).input_grads)
        elif kind is Kind.RECV_B:
            if not forward_only:
                self._slot(action.stage, action.microbatch).output_grads = self._recv("B", action)
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(kind)

    # --- compute -----------------------------------------------------------------------------------
    def _is_first(self, stage: int) -> bool:
        return self.topology.prev_stage(stage) is None

    def _is_last(self, stage: int) -> bool:
        return self.topology.next_stage(stage) is None

    def _forward(self, action: Action) -> None:
        stage, mb = action.stage, action.microbatch
        assert mb is not None
        slot = self._slot(stage, mb)
        chain = self.topology.chain_of(stage)
        self._fill_inputs(slot, stage, mb, chain)
        outputs = _as_tuple(self.stage_modules[stage](*slot.inputs))
        slot.outputs = outputs
        if self._is_last(stage):
            self._outputs.setdefault(chain, {})[mb] = tuple(o.detach() for o in outputs)
            if self._inputs.criterion is not None:
                labels = self._inputs.labels.get(chain)
                slot.loss = self._inputs.criterion(*outputs, *(labels[mb] if labels else ()))
                self._losses.setdefault(chain, {})[mb] = slot.loss.detach()

    def _local(self, stage: int | None) -> bool:
        """Whether ``stage`` is held by this rank (its tensors pass without p2p)."""
        return stage is not None and self.topology.rank_of(stage) == self.rank

    def _fill_inputs(self, slot: _Slot, stage: int, mb: int, chain: int) -> None:
        prev = self.topology.prev_stage(stage)
        if prev is None:
            slot.inputs = self._inputs.chunks[chain][mb]
        elif self._local(prev):
            grad = torch.is_grad_enabled()
            slot.inputs = tuple(o.detach().requires_grad_(grad and o.is_floating_point()) for o in self._slot(prev, mb).outputs)

    def _backward_roots(self, slot: _Slot, stage: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if self._is_last(stage):
            if slot.loss is None:
                raise ValueError("a backward on the last stage needs a loss: pass criterion= to step()")
            return [slot.loss], [None]
        nxt = self.topology.next_stage(stage)
        if slot.output_grads is None and self._local(nxt):
            slot.output_grads = self._slot(nxt, self._mb_of(slot)).input_grads
        assert slot.output_grads is not None, "the output gradient was never received"
        pairs = [(o, g) for o, g in zip(slot.outputs, slot.output_grads, strict=True) if o.requires_grad and g is not None]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _grad_inputs(self, slot: _Slot, stage: int) -> list[torch.Tensor]:
        if self._is_first(stage):
            return []
        return [t for t in slot.inputs if t.requires_grad]

    def _backward(self, action: Action) -> None:
        stage, mb = action.stage, action.microbatch
        assert mb is not None
        slot = self._slot(stage, mb)
        if action.kind is Kind.W:
            self._weight_backward(slot, stage)
            return
        roots, grads = self._backward_roots(slot, stage)
        wrt = self._grad_inputs(slot, stage)
        if action.kind is Kind.B:
            torch.autograd.backward(roots, grads)
            slot.input_grads = tuple(t.grad for t in slot.inputs) if wrt else ()
            self._release(slot, keep_for_weights=False)
            return
        # I: input gradients now; the W later runs only the parameter side of the graph from the gradients
        # recorded here (dualpipe.split_backward). Without input gradients to compute (a chain's first stage)
        # the I has nothing to do and the W runs the whole weight backward.
        self.store.begin_input_backward()
        try:
            if wrt:
                computed, slot.weight_work = input_backward(roots, grads, wrt, self._params(stage))
            else:
                computed = ()
        finally:
            self.store.end_input_backward()
        by_id = {id(t): g for t, g in zip(wrt, computed, strict=True)}
        slot.input_grads = tuple(by_id.get(id(t)) for t in slot.inputs) if wrt else ()
        slot.weight_pending = True
        if slot.weight_work is not None:
            self._release(slot, keep_for_weights=False)  # the recorded boundary keeps what the W needs alive

    def _params(self, stage: int) -> list[torch.Tensor]:
        return [p for p in self.stage_modules[stage].parameters() if p.requires_grad]

    def _weight_backward(self, slot: _Slot, stage: int) -> None:
        if not slot.weight_pending:
            raise RuntimeError("W ran before its I")
        slot.weight_pending = False
        if slot.weight_work is not None:
            self.store.begin_weight_backward()
            try:
                weight_backward(slot.weight_work)
            except BaseException:
                self.store._replaying = None
                raise
            slot.weight_work = None
        else:
            params = self._params(stage)
            roots, grads = self._backward_roots(slot, stage)
            if params and roots:
                torch.autograd.backward(roots, grads, inputs=params)
        self.store.pop()
        self._release(slot, keep_for_weights=False)

    @staticmethod
    def _release(slot: _Slot, keep_for_weights: bool) -> None:
        if not keep_for_weights:
            slot.outputs = ()
            slot.loss = None
            slot.output_grads = None
            slot.inputs = ()

    def _has_overlap_hook(self, fwd: Action, bwd: Action) -> bool:
        module0 = self.stage_modules[fwd.stage]
        return callable(getattr(type(module0), "overlapped_forward_backward", None))

    def _overlapped(self, fwd: Action, bwd: Action) -> None:
        """DeepSeek's hook: ``overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
        outputs1, output_grads1) -> (outputs0, loss0)`` runs F of ``fwd`` and B of ``bwd`` interleaved."""
        f_stage, f_mb = fwd.stage, fwd.microbatch
        b_stage, b_mb = bwd.stage, bwd.microbatch
        assert f_mb is not None and b_mb is not None
        f_slot, b_slot = self._slot(f_stage, f_mb), self._slot(b_stage, b_mb)
        f_chain = self.topology.chain_of(f_stage)
        self._fill_inputs(f_slot, f_stage, f_mb, f_chain)
        criterion0 = labels0 = None
        if self._is_last(f_stage):
            criterion0 = self._inputs.criterion
            labels = self._inputs.labels.get(f_chain)
            labels0 = labels[f_mb] if labels else ()
        if self._is_last(b_stage):
            loss1, outputs1, grads1 = b_slot.loss, None, None
        else:
            roots, grads = self._backward_roots(b_slot, b_stage)
            loss1, outputs1, grads1 = None, roots, grads
        module0, module1 = self.stage_modules[f_stage], self.stage_modules[b_stage]
        outputs0, loss0 = type(module0).overlapped_forward_backward(
            module0, f_slot.inputs, criterion0, labels0, module1, loss1, outputs1, grads1
        )
        f_slot.outputs = _as_tuple(outputs0)
        if self._is_last(f_stage):
            self._outputs.setdefault(f_chain, {})[f_mb] = tuple(o.detach() for o in f_slot.outputs)
            if loss0 is not None:
                f_slot.loss = loss0
                self._losses.setdefault(f_chain, {})[f_mb] = loss0.detach()
        b_slot.input_grads = tuple(t.grad for t in b_slot.inputs) if self._grad_inputs(b_slot, b_stage) else ()
        self._release(b_slot, keep_for_weights=False)

    # --- point to point ----------------------------------------------------------------------------
    def _peer(self, stage: int | None) -> int:
        assert stage is not None
        return self.peer_ranks[self.topology.rank_of(stage)]

    def _receives(self, actions: Sequence[Action], forward_only: bool) -> list[tuple[int, TransferId]]:
        """This rank's receives in plan order: ``(peer, (direction, sending stage, micro-batch))``."""
        out: list[tuple[int, TransferId]] = []
        for action in actions:
            if action.kind is Kind.RECV_F:
                sender = self.topology.prev_stage(action.stage)
                out.append((self._peer(sender), ("F", sender, action.microbatch)))  # type: ignore[arg-type]
            elif action.kind is Kind.RECV_B and not forward_only:
                sender = self.topology.next_stage(action.stage)
                out.append((self._peer(sender), ("B", sender, action.microbatch)))  # type: ignore[arg-type]
        return out

    def _send(self, direction: str, action: Action, tensors: Sequence[torch.Tensor | None]) -> None:
        stage = action.stage
        receiver = self.topology.next_stage(stage) if direction == "F" else self.topology.prev_stage(stage)
        self._transport.send(self._peer(receiver), (direction, stage, action.microbatch), tensors)  # type: ignore[arg-type]

    def _recv(self, direction: str, action: Action) -> tuple[torch.Tensor, ...]:
        stage = action.stage
        sender = self.topology.prev_stage(stage) if direction == "F" else self.topology.next_stage(stage)
        what = f"a tensor from pipeline rank {self.topology.rank_of(sender)} (stage {sender})"  # type: ignore[arg-type]
        return self._transport.recv(self._peer(sender), (direction, sender, action.microbatch), what)  # type: ignore[arg-type,return-value]
