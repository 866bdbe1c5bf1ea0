"""Train a small DeepSeek-V3-style MoE language model with expert parallelism through moe_comm.

The model: token + position embeddings, then layers of causal self-attention and an MoE block (sigmoid
router scores, top-k over many small SwiGLU experts, auxiliary-loss-free load balancing: a per-expert
bias is added to the scores for *selection only* and nudged each step by the sign of the expert's load
error; one shared expert), then an LM head. The task is synthetic but learnable: token ``t`` must predict
``(x[t] + x[t-1]) mod V``.

Parallelism: the ranks form a PP x EP grid. Each EP group spreads the routed experts of each MoE layer
(``moe_comm.nn.ExpertParallelMoE`` over a ``moe_comm.Buffer``) and data-parallelises everything else.
With ``--pp 2`` or more (and ``dualpipe.DualPipeV`` available) the layers are cut into 2*PP stages run by
DualPipeV; the stage class defines ``overlapped_forward_backward``, which starts one micro-batch's
dispatch/combine and runs the other micro-batch's backward while it is in flight.

Run it any of these ways (defaults: 4 CPU ranks without a GPU, one rank per GPU otherwise)::

    python examples/train_moe.py --steps 200            # spawns its own ranks
    torchrun --nproc-per-node 4 examples/train_moe.py
    mpirun -n 4 python examples/train_moe.py

It prints per-step loss, tokens/s and the share of time spent in dispatch/combine, shows a progress bar
(tqdm), writes ``--png`` (loss curve, matplotlib) and ``--json`` (per-step losses and timings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_comm.buffer import Buffer  # noqa: E402
from moe_comm.nn import ExpertParallelMoE, GroupedExperts  # noqa: E402


@dataclass
class ModelConfig:
    vocab: int = 32
    seq: int = 24
    dim: int = 64
    heads: int = 4
    layers: int = 4
    experts: int = 16
    topk: int = 4
    expert_dim: int = 32
    shared_dim: int = 64
    bias_update_rate: float = 1e-3


@dataclass
class TrainConfig:
    steps: int = 200
    batch: int = 32  # sequences per EP rank per step
    lr: float = 3e-3
    seed: int = 0
    pp: int = 1
    ep: int = 1
    chunks: int = 0  # micro-batches for DualPipeV (0: 2 * 2 * pp)
    dtype: str = "float32"
    backend: str = "auto"
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)


# ----------------------------------------------------------------------------------------------------
# data


def make_batch(cfg: ModelConfig, batch: int, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, seq]`` random tokens and targets ``(x[t] + x[t-1]) mod V`` (``x[-1] = 0``)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=gen)
    prev = torch.cat([torch.zeros(batch, 1, dtype=x.dtype), x[:, :-1]], dim=1)
    return x, (x + prev) % cfg.vocab


# ----------------------------------------------------------------------------------------------------
# model


class TimedBuffer:
    """A :class:`Buffer` proxy that adds the time spent in dispatch/combine (issue + wait) to ``seconds``."""

    def __init__(self, buffer: Buffer) -> None:
        self._buffer = buffer
        self.seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self._buffer, name)

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        event = result.event
        if event is not None:
            wait = event.current_stream_wait

            def timed_wait() -> None:
                t1 = time.perf_counter()
                wait()
                self.seconds += time.perf_counter() - t1

            event.current_stream_wait = timed_wait
        return result

    def dispatch(self, *args, **kwargs):
        return self._timed(self._buffer.dispatch, *args, **kwargs)

    def combine(self, *args, **kwargs):
        return self._timed(self._buffer.combine, *args, **kwargs)


class Router(nn.Module):
    """DeepSeek-V3 gate: sigmoid scores; selection on ``scores + bias``; weights = selected scores, normalised."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.topk = cfg.topk
        self.weight = nn.Parameter(torch.randn(cfg.experts, cfg.dim) * cfg.dim**-0.5)
        self.register_buffer("bias", torch.zeros(cfg.experts))
        self.register_buffer("load", torch.zeros(cfg.experts))  # tokens per expert since the last bias update

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(x_TD @ self.weight.T)
        idx = torch.topk(scores.detach() + self.bias, self.topk, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(dim=-1, keepdim=True)
        with torch.no_grad():
            self.load += torch.bincount(idx.flatten(), minlength=self.load.numel()).to(self.load.dtype)
        return idx, w


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, buffer, rank: int, ep: int, full_experts: GroupedExperts) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.router = Router(cfg)
        local = cfg.experts // ep
        with torch.random.fork_rng():  # the global RNG stream must not depend on how many experts are local
            experts = GroupedExperts(local, cfg.dim, cfg.expert_dim)
        with torch.no_grad():
            sl = slice(rank * local, (rank + 1) * local)
            for name in ("w1", "w2", "w3"):
                getattr(experts, name).copy_(getattr(full_experts, name)[sl])
        shared = nn.Sequential(nn.Linear(cfg.dim, cfg.shared_dim, bias=False), nn.SiLU(), nn.Linear(cfg.shared_dim, cfg.dim, bias=False))
        self.moe = ExpertParallelMoE(experts, cfg.experts, buffer=buffer, shared_experts=shared)

    def attention(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x_BSD + self.proj(a.transpose(1, 2).reshape(b, s, d))

    def moe_start(self, x_BSD: torch.Tensor):
        """Route and start the dispatch; returns the state ``moe_finish`` needs."""
        h = self.norm2(x_BSD).flatten(0, 1)
        idx, w = self.router(h)
        return x_BSD, h, self.moe.dispatch_async(h, idx, w)

    def moe_finish(self, state) -> torch.Tensor:
        x_BSD, h, pending = state
        shared = self.moe.shared_experts(h)  # runs while the dispatch is in flight
        got = pending.wait()
        out = self.moe.combine_async(got, self.moe.compute_experts(got)).wait()
        return x_BSD + (out + shared).view_as(x_BSD)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.moe_finish(self.moe_start(self.attention(x_BSD)))


class Stage(nn.Module):
    """A contiguous slice of the model: optional embeddings, some blocks, optional head."""

    def __init__(self, cfg: ModelConfig, blocks: list[Block], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim) if first else None
        self.pos = nn.Parameter(torch.randn(cfg.seq, cfg.dim) * 0.02) if first else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.dim) if last else None
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1):
        """Forward of one micro-batch on ``module0`` overlapped with the backward of another on ``module1``.

        Each MoE layer's dispatch of micro-batch 0 is started, then the backward of micro-batch 1 runs
        (its own collectives included) while that dispatch is in flight, and the forward resumes after.
        """
        (x,) = inputs0
        if module0.embed is not None:
            x = module0.embed(x) + module0.pos
        backward_done = False
        for block in module0.blocks:
            state = block.moe_start(block.attention(x))
            if not backward_done:
                _run_backward(loss1, outputs1, output_grads1)
                backward_done = True
            x = block.moe_finish(state)
        if not backward_done:
            _run_backward(loss1, outputs1, output_grads1)
        if module0.head is not None:
            x = module0.head(module0.norm(x))
        outputs0 = (x,)
        loss0 = criterion0(x, *labels0) if criterion0 is not None else None
        return outputs0, loss0


def _run_backward(loss, outputs, output_grads) -> None:
    if loss is not None:
        loss.backward()
    elif outputs is not None:
        outs = [o for o in outputs if o is not None and o.requires_grad]
        grads = [g for o, g in zip(outputs, output_grads, strict=True) if o is not None and o.requires_grad]
        torch.autograd.backward(outs, grads)


def build_full_layers(cfg: ModelConfig, seed: int) -> list[GroupedExperts]:
    torch.manual_seed(seed)
    return [GroupedExperts(cfg.experts, cfg.dim, cfg.expert_dim) for _ in range(cfg.layers)]


def build_model(cfg: ModelConfig, seed: int, buffer, ep_rank: int, ep: int) -> Stage:
    """The whole model as one stage (every rank builds identical non-expert weights from ``seed``)."""
    full = build_full_layers(cfg, seed)
    torch.manual_seed(seed + 1)
    blocks = [Block(cfg, buffer, ep_rank, ep, full[i]) for i in range(cfg.layers)]
    return Stage(cfg, blocks, first=True, last=True)


def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------------------------------
# training


def _expert_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def sync_and_balance(model: nn.Module, ep_group, ep: int, rate: float) -> None:
    """Average replicated gradients over the EP group, scale expert gradients, update routing biases."""
    experts = _expert_params(model)
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    if ep > 1 and replicated:
        flat = torch.cat([g.flatten() for g in replicated])
        dist.all_reduce(flat, group=ep_group)
        offset = 0
        for g in replicated:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    for p in model.parameters():
        if p.grad is None:
            continue
        # Replicated: the mean of EP ranks' gradients; experts: their tokens' sum over EP ranks, also / ep.
        p.grad.div_(ep)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if routers:
        loads = torch.stack([r.load for r in routers])
        if ep > 1:
            dist.all_reduce(loads, group=ep_group)
        for r, load in zip(routers, loads, strict=True):
            r.bias += rate * torch.sign(load.mean() - load)
            r.load.zero_()


def split_stages(full: Stage, num_stages: int) -> list[Stage]:
    """Cut a whole-model :class:`Stage` into ``num_stages`` consecutive stages (sharing its modules)."""
    cfg = full.cfg
    if cfg.layers < num_stages:
        raise ValueError(f"layers: {cfg.layers} layers cannot fill {num_stages} pipeline stages; use at least {num_stages} layers or a smaller --pp")
    sizes = [cfg.layers // num_stages + (i < cfg.layers % num_stages) for i in range(num_stages)]
    stages, start = [], 0
    for i, n in enumerate(sizes):
        stage = Stage(cfg, list(full.blocks[start : start + n]), first=False, last=False)
        if i == 0:
            stage.embed, stage.pos = full.embed, full.pos
        if i == num_stages - 1:
            stage.norm, stage.head = full.norm, full.head
        stages.append(stage)
        start += n
    return stages


def _dualpipev():
    """``dualpipe.DualPipeV`` (the pipeline runtime), or ``None`` where this checkout lacks it."""
    try:
        from dualpipe import DualPipeV  # type: ignore[attr-defined]
    except ImportError:
        try:
            from dualpipe.modules import DualPipeV  # type: ignore[import-not-found]
        except ImportError:
            return None
    return DualPipeV


def train(tc: TrainConfig, ep_group=None, pp_group=None, quiet: bool = False) -> dict:
    """Train on the calling ranks; returns ``{"loss": [...], "step_s": [...], "comm_s": [...], ...}`` (rank 0's view).

    With a ``pp_group`` of more than one rank the model runs as DualPipeV over it: pipeline rank ``r`` holds
    stages ``r`` and ``2 PP - 1 - r``; inputs and labels enter, and the loss leaves, at pipeline rank 0.
    """
    cfg = tc.model
    ep = dist.get_world_size(ep_group)
    ep_rank = dist.get_rank(ep_group)
    pp = dist.get_world_size(pp_group) if pp_group is not None else 1
    pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
    dtype = getattr(torch, tc.dtype)
    buffer = TimedBuffer(Buffer(ep_group, backend=tc.backend, num_experts=cfg.experts))
    torch.set_default_dtype(dtype)
    try:
        model = build_model(cfg, tc.seed, buffer, ep_rank, ep)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = None
    chunks = 1
    if pp > 1:
        DualPipeV = _dualpipev()
        if DualPipeV is None:
            raise RuntimeError("--pp > 1 needs dualpipe.DualPipeV; run with --pp 1")
        stages = split_stages(model, 2 * pp)
        model = nn.ModuleList([stages[pp_rank], stages[2 * pp - 1 - pp_rank]])
        pipe = DualPipeV((model[0], model[1]), process_group=pp_group)
        chunks = tc.chunks or 2 * pp * 2
        if tc.batch % chunks:
            raise ValueError(f"batch: {tc.batch} sequences cannot be cut into {chunks} micro-batches")
    optim = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    is_main = dist.get_rank() == 0 and not quiet
    bar = None
    if is_main and tc.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, desc="train", dynamic_ncols=True)
        except ImportError:
            bar = None
    history: dict = {"loss": [], "step_s": [], "comm_s": [], "tokens_per_s": []}
    for step in range(tc.steps):
        x, y = make_batch(cfg, tc.batch * ep, step, tc.seed)
        x, y = x[ep_rank * tc.batch : (ep_rank + 1) * tc.batch], y[ep_rank * tc.batch : (ep_rank + 1) * tc.batch]
        buffer.seconds = 0.0
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        if pipe is None:
            loss = criterion(model(x), y)
            loss.backward()
            loss = loss.detach()
        elif pp_rank == 0:
            loss, _ = pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,))
            loss = loss.detach().float().mean()
        else:
            pipe.step(num_chunks=chunks)
            loss = None
        if pipe is not None:
            for p in model.parameters():  # the pipeline sums the micro-batches' mean losses
                if p.grad is not None:
                    p.grad.div_(chunks)
        sync_and_balance(model, ep_group, ep, cfg.bias_update_rate)
        optim.step()
        step_s = time.perf_counter() - t0
        tokens = tc.batch * ep * cfg.seq
        history["step_s"].append(step_s)
        history["comm_s"].append(buffer.seconds)
        history["tokens_per_s"].append(tokens / step_s)
        if loss is None:
            continue
        mean_loss = loss.double()
        if ep > 1:
            dist.all_reduce(mean_loss, group=ep_group)
            mean_loss /= ep
        history["loss"].append(float(mean_loss))
        if is_main:
            msg = f"loss {float(mean_loss):.4f}  {tokens / step_s:,.0f} tok/s  comm {100 * buffer.seconds / step_s:.0f}%"
            if bar is not None:
                bar.set_postfix_str(msg)
                bar.update(1)
            elif step % 10 == 0 or step == tc.steps - 1:
                print(f"step {step:4d}  {msg}", flush=True)
    if bar is not None:
        bar.close()
    buffer.destroy()
    return history


# ----------------------------------------------------------------------------------------------------
# entry points


def _grid(tc: TrainConfig):
    """Make the PP x EP groups: rank = pp_rank * EP + ep_rank. Returns (ep_group, pp_group)."""
    world = dist.get_world_size()
    if tc.pp * tc.ep != world:
        raise ValueError(f"--pp {tc.pp} x --ep {tc.ep} != {world} ranks; choose sizes whose product is the world size")
    rank = dist.get_rank()
    ep_group = pp_group = None
    for p in range(tc.pp):
        g = dist.new_group([p * tc.ep + e for e in range(tc.ep)])
        if rank // tc.ep == p:
            ep_group = g
    for e in range(tc.ep):
        g = dist.new_group([p * tc.ep + e for p in range(tc.pp)])
        if rank % tc.ep == e:
            pp_group = g
    return ep_group, pp_group


def rank_main(tc: TrainConfig) -> dict:
    ep_group, pp_group = _grid(tc)
    return train(tc, ep_group, pp_group)


def _report(history: dict, args) -> None:
    losses = history["loss"]
    comm = sum(history["comm_s"]) / max(sum(history["step_s"]), 1e-9)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; "
          f"median {sorted(history['tokens_per_s'])[len(losses) // 2]:,.0f} tokens/s; {100 * comm:.0f}% of step time in dispatch/combine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, **history}, f, indent=1)
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses)
        ax.axhline(math.log(args.config["model"]["vocab"]), ls="--", c="gray", label="uniform guess")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
        ax.set_title(f"train_moe: PP {args.config['pp']} x EP {args.config['ep']}")
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--nprocs", type=int, default=0, help="ranks to spawn when not under torchrun/mpirun (default: GPUs, or 4 on CPU)")
    parser.add_argument("--pp", type=int, default=0, help="pipeline stages pairs (default 1; 2 when DualPipeV is available and ranks allow)")
    parser.add_argument("--ep", type=int, default=0, help="expert-parallel group size (default: ranks / pp)")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--png", default="train_moe_loss.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from moe_comm.launch import detect_launcher, init_distributed, spawn

    launched = detect_launcher() != "single"
    if launched:
        init_distributed()
        world = dist.get_world_size()
    else:
        world = args.nprocs or (torch.cuda.device_count() or 4)
    pp = args.pp or (2 if _dualpipev() is not None and world % 2 == 0 and world >= 4 else 1)
    ep = args.ep or world // pp
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, pp=pp, ep=ep, progress=not args.no_progress)
    args.config = asdict(tc)
    if launched:
        history = rank_main(tc)
        if dist.get_rank() == 0:
            _report(history, args)
        dist.destroy_process_group()
    else:
        history = spawn(rank_main, world, tc)[0]
        _report(history, args)


if __name__ == "__main__":
    main()
