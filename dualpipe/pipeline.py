"""Pipeline modules with DeepSeek's DualPipe API, run by the schedule executor.

- :class:`DualPipeV`: rank r holds stages r and 2R-1-r of one V-shaped chain (``modules = (stage r,
  stage 2R-1-r)``). Inputs, labels and losses live on rank 0.
- :class:`DualPipe`: two chains in opposite directions; rank r holds stage r of chain 0 and the mirror copy of
  stage R-1-r, run by chain 1 (``modules = (stage r, stage R-1-r)``). Rank 0 feeds chain 0 and computes
  chain 1's loss, rank R-1 the reverse. The two copies of each stage must be summed after backward:
  :meth:`DualPipe.sync_mirrored_grads` does it in one call (or ``step(..., sync_grads=True)``).
- :class:`PipelineRunner`: any plan (``"1f1b"``, ``"zb1p"``, ``"dualpipe"``, ``"dualpipev"`` or a
  :class:`~dualpipe.ir.Schedule`) over a dict of stage modules.

Every step starts by checking, with a bounded collective, that all ranks run the same schedule with the same
chunk count, so a disagreement raises on every rank instead of hanging.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.executor import Executor, StepInputs, WeightGradStore
from dualpipe.ir import Schedule
from dualpipe.p2p import Layouts
from dualpipe.schedules import SCHEDULES, generate
from dualpipe.validate import lower_to_p2p

__all__ = ["DualPipe", "DualPipeV", "PipelineRunner", "WeightGradStore"]


def _split(tensors: Sequence[torch.Tensor], num_chunks: int, batch_dim: int) -> list[tuple[torch.Tensor, ...]]:
    """Cut each tensor into ``num_chunks`` contiguous micro-batches along ``batch_dim`` (``torch.tensor_split``)."""
    if not tensors:
        return [() for _ in range(num_chunks)]
    pieces = [torch.tensor_split(t, num_chunks, dim=batch_dim) for t in tensors]
    # Contiguous micro-batches: the same memory layout whether a stage gets its input locally or by p2p.
    return [tuple(p[i].contiguous() for p in pieces) for i in range(num_chunks)]


def _pipeline_position(group: dist.ProcessGroup | None, rank_mapping: Sequence[int] | None) -> tuple[int, list[int], int]:
    """``(pipeline ranks, plan rank -> group rank mapping, this process's plan rank)``."""
    world = dist.get_world_size(group)
    mapping = list(rank_mapping) if rank_mapping is not None else list(range(world))
    return world, mapping, mapping.index(dist.get_rank(group))


class PipelineRunner(nn.Module):
    """Run a pipeline plan over this rank's stage modules.

    Args:
        schedule: a plan name from :data:`dualpipe.SCHEDULES` or a :class:`~dualpipe.ir.Schedule` (then
            ``num_chunks`` must match it).
        stage_modules: stage id -> module for every stage this rank holds.
        process_group: the pipeline group (``None`` = default group); plan rank r is group rank
            ``rank_mapping[r]``.
        rank_mapping: plan rank -> group rank (default identity).
        batch_dim: dimension along which ``step`` cuts inputs and labels into micro-batches.
        timeout_s: bound on every wait.
    """

    def __init__(
        self,
        schedule: str | Schedule,
        stage_modules: dict[int, nn.Module],
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        batch_dim: int = 0,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__()
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown plan {schedule!r}; choose one of {SCHEDULES} or pass a Schedule")
        self.schedule_spec = schedule
        self.stages = nn.ModuleDict({str(s): m for s, m in stage_modules.items()})
        self.group = process_group
        self.num_ranks = dist.get_world_size(process_group)
        group_rank = dist.get_rank(process_group)
        self.rank_mapping = list(rank_mapping) if rank_mapping is not None else list(range(self.num_ranks))
        if sorted(self.rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping: expected a permutation of 0..{self.num_ranks - 1}, got {self.rank_mapping}")
        self.rank = self.rank_mapping.index(group_rank)
        self.batch_dim = batch_dim
        self.timeout_s = timeout_s
        self.weight_grad_store = WeightGradStore()
        self._p2p_shapes: list[tuple[int, ...]] | None = None
        self._p2p_dtype: torch.dtype | None = None
        self._plan_cache: dict[int, tuple[Schedule, Schedule]] = {}
        self._p2p_layouts = Layouts()  # transfer layout predictions, carried from step to step

    # --- compatibility with DeepSeek's module-level setters (optional here) ------------------------
    def set_p2p_tensor_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """Accepted for compatibility; shapes travel with every message, so they may vary per micro-batch."""
        self._p2p_shapes = [tuple(s) for s in shapes]

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """Accepted for compatibility; dtypes travel with every message."""
        self._p2p_dtype = dtype

    # ----------------------------------------------------------------------------------------------
    def _plan(self, num_chunks: int) -> Schedule:
        return self._plans(num_chunks)[0]

    def _plans(self, num_chunks: int) -> tuple[Schedule, Schedule]:
        """``(plan, its p2p lowering)`` for ``num_chunks``, built once per chunk count."""
        cached = self._plan_cache.get(num_chunks)
        if cached is None:
            plan = self.schedule_spec if isinstance(self.schedule_spec, Schedule) else generate(self.schedule_spec, self.num_ranks, num_chunks)
            cached = (plan, lower_to_p2p(plan) if plan.topology.num_ranks > 1 else plan)
            self._plan_cache[num_chunks] = cached
        return cached

    def _agree(self, num_chunks: int, forward_only: bool) -> None:
        """Every rank must run the same plan with the same chunk count; raise on every rank otherwise."""
        if self.num_ranks == 1:
            return
        name = self.schedule_spec if isinstance(self.schedule_spec, str) else self.schedule_spec.name
        code = sum((i + 1) * ord(c) for i, c in enumerate(name))
        mine = torch.tensor([[num_chunks, code, int(forward_only)]], dtype=torch.int64)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        table = torch.empty(self.num_ranks, 3, dtype=torch.int64, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(table, mine.to(device), group=self.group, async_op=True)
        if device.type == "cuda":
            work.wait()
        else:
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                raise TimeoutError(f"dualpipe rank {self.rank}: timed out waiting for the other ranks to start a step") from exc
        table = table.cpu()
        for column, what in ((0, "num_chunks"), (1, "schedule"), (2, "torch.no_grad() (forward-only) mode")):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                raise ValueError(f"dualpipe rank {self.rank}: {what} differs between ranks: {values} (rank order); every rank must pass the same")

    def run(
        self,
        num_chunks: int,
        chunks: dict[int, list[tuple[torch.Tensor, ...]]],
        labels: dict[int, list[tuple[torch.Tensor, ...]]],
        criterion: Callable[..., torch.Tensor] | None,
    ) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[tuple[torch.Tensor, ...]]]]:
        """Run the plan on pre-split micro-batches (per chain); see :meth:`Executor.run`."""
        forward_only = not torch.is_grad_enabled()
        self._agree(num_chunks, forward_only)
        plan, lowered = self._plans(num_chunks)
        executor = Executor(
            plan,
            self.rank,
            {int(s): m for s, m in self.stages.items()},
            self.group,
            [dist.get_global_rank(self.group, r) if self.group is not None else r for r in self.rank_mapping],
            timeout_s=self.timeout_s,
            lowered=lowered,
            layouts=self._p2p_layouts,
        )
        executor.store = self.weight_grad_store
        return executor.run(StepInputs(chunks, labels, criterion), forward_only=forward_only)

    def step(
        self,
        *inputs: torch.Tensor,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor] = (),
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, Any]:
        """One training (or, under ``torch.no_grad()``, inference) step of a single-chain plan.

        Args:
            inputs: the first stage's inputs, on the rank holding it (ignored elsewhere); cut into ``num_chunks``.
            num_chunks: micro-batches per step (the same on every rank).
            criterion: ``criterion(*outputs, *labels) -> loss`` on the last stage.
            labels: the last stage's labels, on its rank; cut like the inputs.
            return_outputs: also return the last stage's outputs (concatenated along ``batch_dim``).

        Returns:
            ``(loss, outputs)``: on the last stage's rank, the per-micro-batch losses ``[num_chunks]`` (when a
            criterion is given) and the outputs when asked; ``(None, None)`` elsewhere.
        """
        if num_chunks <= 0:
            raise ValueError(f"num_chunks: expected a positive micro-batch count, got {num_chunks}")
        topo = self._plan(num_chunks).topology
        first, last = topo.chains[0][0], topo.chains[0][-1]
        chunks = {0: _split(inputs, num_chunks, self.batch_dim)} if topo.rank_of(first) == self.rank else {}
        label_chunks = {0: _split(labels, num_chunks, self.batch_dim)} if topo.rank_of(last) == self.rank else {}
        losses, outputs = self.run(num_chunks, chunks, label_chunks, criterion)
        return self._results(losses.get(0), outputs.get(0), return_outputs)

    def _results(self, losses: list[torch.Tensor] | None, outputs: list[tuple[torch.Tensor, ...]] | None, return_outputs: bool) -> tuple[torch.Tensor | None, Any]:
        loss = torch.stack(losses) if losses else None
        out = None
        if return_outputs and outputs:
            columns = list(zip(*outputs, strict=True))
            merged = [torch.cat(c, dim=self.batch_dim) for c in columns]
            out = merged[0] if len(merged) == 1 else tuple(merged)
        return loss, out


class DualPipeV(PipelineRunner):
    """DeepSeek's DualPipeV: ``modules = (stage r, stage 2R-1-r)`` on pipeline rank r.

    ``step(*inputs, num_chunks, criterion, labels, return_outputs)``: inputs and labels on rank 0 (which holds
    the first and the last stage); ``num_chunks >= 2R``. Returns ``(losses [num_chunks], outputs)`` on rank 0.
    """

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        world, mapping, rank = _pipeline_position(process_group, rank_mapping)
        stages = {rank: modules[0], 2 * world - 1 - rank: modules[1]}
        super().__init__("dualpipev", stages, process_group, mapping, batch_dim, timeout_s)


class DualPipe(PipelineRunner):
    """DeepSeek's DualPipe: ``modules = (stage r, stage R-1-r)`` on pipeline rank r, R even.

    Chain 0 runs stages 0..R-1 left to right (rank 0 gives its inputs, rank R-1 its labels); chain 1 runs the
    mirror copies right to left (rank R-1 gives inputs, rank 0 labels). Each chain takes ``num_chunks / 2``
    micro-batches. After backward each stage has gradients in two copies (rank r's ``modules[0]`` and rank
    R-1-r's ``modules[1]``): :meth:`sync_mirrored_grads` adds them so both copies hold the full gradient.
    """

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        world, mapping, rank = _pipeline_position(process_group, rank_mapping)
        stages = {rank: modules[0], world + (world - 1 - rank): modules[1]}
        super().__init__("dualpipe", stages, process_group, mapping, batch_dim, timeout_s)
        self.module_pair = modules

    def step(  # type: ignore[override]
        self,
        *inputs: torch.Tensor,
        num_chunks: int = 0,
        criterion: Callable[..., torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor] = (),
        return_outputs: bool = False,
        sync_grads: bool = False,
    ) -> tuple[torch.Tensor | None, Any]:
        """One step. ``inputs`` on ranks 0 and R-1 (each feeds its chain ``num_chunks / 2`` micro-batches),
        ``labels`` on the same ranks (for the chain that ends there). Returns that chain's per-micro-batch
        losses and outputs on ranks 0 and R-1. ``sync_grads=True`` calls :meth:`sync_mirrored_grads` after."""
        if num_chunks <= 0 or num_chunks % 2:
            raise ValueError(f"num_chunks: DualPipe needs a positive even chunk count, got {num_chunks}")
        half = num_chunks // 2
        last = self.num_ranks - 1
        chunks: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        label_chunks: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        if self.rank == 0:
            chunks[0] = _split(inputs, half, self.batch_dim)
            label_chunks[1] = _split(labels, half, self.batch_dim)
        if self.rank == last:
            chunks[1] = _split(inputs, half, self.batch_dim)
            label_chunks[0] = _split(labels, half, self.batch_dim)
        losses, outputs = self.run(num_chunks, chunks, label_chunks, criterion)
        chain = 1 if self.rank == 0 else 0
        if sync_grads and torch.is_grad_enabled():
            self.sync_mirrored_grads()
        return self._results(losses.get(chain), outputs.get(chain), return_outputs)

    def sync_mirrored_grads(self) -> None:
        """Sum the gradients of each stage's two copies (rank r's ``modules[0]`` with rank R-1-r's ``modules[1]``)."""
        partner = self.num_ranks - 1 - self.rank
        mine0 = [p for p in self.module_pair[0].parameters() if p.requires_grad]
        mine1 = [p for p in self.module_pair[1].parameters() if p.requires_grad]

        def flat(params: list[nn.Parameter]) -> torch.Tensor:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            return torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)

        send0, send1 = flat(mine0), flat(mine1)
        recv_for0, recv_for1 = torch.empty_like(send1), torch.empty_like(send0)
        peer = dist.get_global_rank(self.group, self.rank_mapping[partner]) if self.group is not None else self.rank_mapping[partner]
        # My modules[0] mirrors the partner's modules[1], and the other way round.
        ops = [
            dist.P2POp(dist.isend, send0, peer, self.group),
            dist.P2POp(dist.isend, send1, peer, self.group),
            dist.P2POp(dist.irecv, recv_for1, peer, self.group),
            dist.P2POp(dist.irecv, recv_for0, peer, self.group),
        ]
        if self.rank > partner:  # mirror the posting order so same-peer messages match in FIFO order
            ops = [ops[2], ops[3], ops[0], ops[1]]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for params, incoming in ((mine0, recv_for0), (mine1, recv_for1)):
            offset = 0
            for p in params:
                n = p.numel()
                piece = incoming[offset : offset + n].view_as(p)
                p.grad = piece.clone() if p.grad is None else p.grad.add_(piece)
                offset += n
