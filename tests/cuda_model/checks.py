"""Rank bodies of tests/test_cuda_model.py, run in the ranks of a RankPool on the kernel model.

Every body is reached through :func:`on_model`, which installs the model in the rank process first (once;
a restarted pool installs it again). Besides the shared conformance checks (tests/conformance.py, run with
``backend="cudasim"``), this module compares the model-backed ``cuda`` backend bitwise with the portable
``torch`` backend, checks the stream ordering of every synchronous operation, the wrap of the int32 epochs,
and, with a planted fault, that the checks see what the model computes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_comm import Buffer, EventOverlap
from moe_comm.backends import cuda_memory
from moe_comm.errors import BufferCapacityError, CommTimeoutError
from moe_comm.fp8 import per_token_cast_to_fp8
from tests.conformance import Case, make_inputs
from tests.cuda_model.install import MODEL_BACKEND, ModelConfig, install, launcher_replaced, stream_tracker
from tests.cuda_model.kernels import LAUNCHERS, raw
from tests.cuda_model.simt import simt_module
from tests.gpu.emulator_header import write_epochs
from tests.graph_steps import make_step


def on_model(config: ModelConfig, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Install the kernel model in this rank (idempotent), then run ``fn(*args, **kwargs)``."""
    install(config)
    return fn(*args, **kwargs)


def _assert_same(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    """Equal shape, dtype and bytes (floats compared bit by bit)."""
    if got is None or want is None:
        assert got is None and want is None, f"{what}: one side is None"
        return
    got, want = got.cpu().contiguous(), want.cpu().contiguous()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype} {list(got.shape)} vs {want.dtype} {list(want.shape)}"
    if got.is_floating_point():
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got, want), f"{what}: differs from the torch backend"


# ----------------------------------------------------------------------------------------------------
# bitwise against the portable backend


def check_vs_torch(case: Case, worst: bool = False, fp8: bool = False, bias: bool = True, weights: bool = True,
                   alignment: int = 1, async_finish: bool = False, num_sms: int = 20) -> None:
    """Dispatch, combine (with both biases or none), cached dispatch and a second combine: every output and the
    handle of the ``cudasim`` backend (its kernels on ``num_sms`` blocks) equal the ``torch`` backend's bit for
    bit (worst-case mode: the valid rows equal, the padding rows zero)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    data = per_token_cast_to_fp8(x) if fp8 else x
    outputs: dict[str, dict[str, torch.Tensor | None]] = {}
    for backend in ("torch", MODEL_BACKEND):
        with Buffer(backend=backend, num_sms=num_sms) as buf:
            res = buf.dispatch(data, topk_idx=idx, topk_weights=w if weights else None, num_experts=num_experts,
                               expert_alignment=alignment, async_finish=async_finish,
                               num_worst_tokens=(case.tokens + 2) * world if worst else 0)
            if async_finish:
                res.event.current_stream_wait()
            recv_x, recv_scales = res.recv_x if fp8 else (res.recv_x, None)
            rows = recv_x.float() if recv_scales is None else recv_x.float() * recv_scales.repeat_interleave(128, dim=-1)[..., : case.hidden]
            y = (rows * (rank + 1)).to(case.dtype)
            biases = (None, None)
            if bias:
                biases = (torch.randn(x.shape, generator=torch.Generator().manual_seed(rank)).to(case.dtype),
                          torch.randn(x.shape, generator=torch.Generator().manual_seed(rank + 50)))
            combined = buf.combine(y, res.handle, topk_weights=res.recv_topk_weights, bias=biases, async_finish=async_finish)
            if async_finish:
                combined.event.current_stream_wait()
            cached = buf.dispatch(data, handle=res.handle)
            unweighted = buf.combine(y, res.handle)
            handle = res.handle
            outputs[backend] = {
                "recv_x": recv_x, "recv_scales": recv_scales, "recv_topk_idx": res.recv_topk_idx,
                "recv_topk_weights": res.recv_topk_weights,
                "num_recv_tokens_per_expert": torch.tensor(res.num_recv_tokens_per_expert_list, dtype=torch.int64),
                "recv_src_idx": handle.recv_src_idx, "recv_src_rank": handle.recv_src_rank,
                "rank_prefix_matrix": handle.rank_prefix_matrix, "send_token_idx": handle.send_token_idx,
                "num_recv_tokens": torch.tensor(handle.num_recv_tokens),
                "combined_x": combined.combined_x, "combined_topk_weights": combined.combined_topk_weights,
                "cached_recv_x": cached.recv_x[0] if fp8 else cached.recv_x, "unweighted_combined_x": unweighted.combined_x,
            }
    valid = int((outputs["torch"]["recv_src_idx"] >= 0).sum())
    for key, want in outputs["torch"].items():
        got = outputs[MODEL_BACKEND][key]
        if worst and key in ("recv_x", "recv_scales", "cached_recv_x") and got is not None:
            padding = got[valid:]
            assert not bool(padding.float().abs().sum()), f"rank {rank} {key}: padding rows are not zero"
            got, want = got[:valid], want[:valid]
        _assert_same(got, want, f"rank {rank} {key} ({case}, worst={worst}, fp8={fp8})")


def check_low_latency_vs_torch(case: Case, use_fp8: bool, hook: bool, num_sms: int = 20) -> None:
    """Two low-latency dispatch + weighted combine rounds (kernels on ``num_sms`` blocks): counts, layout ranges,
    sources and received rows equal the ``torch`` backend's bitwise; the combined rows agree to bf16 rounding
    (the backends sum in different orders)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    results: dict[str, dict[str, torch.Tensor | None]] = {}
    for backend in ("torch", MODEL_BACKEND):
        with Buffer(backend=backend, num_sms=num_sms) as buf:
            for _ in range(2):
                res = buf.low_latency_dispatch(x.bfloat16(), idx, case.tokens + 4, num_experts, use_fp8=use_fp8, return_recv_hook=hook)
                if hook:
                    res.hook()
                data, scales = res.recv_x if use_fp8 else (res.recv_x, None)
                rows = data.float() if scales is None else data.float() * scales.repeat_interleave(128, dim=-1)[..., : case.hidden]
                factors = (torch.arange(case.experts_per_rank) + rank * case.experts_per_rank + 1).float().view(-1, 1, 1)
                out = buf.low_latency_combine((rows * factors).bfloat16(), idx, w, res.handle, return_recv_hook=hook)
                if hook:
                    out.hook()
            counts = res.recv_count.tolist()

            def valid(t: torch.Tensor, counts: list[int] = counts) -> torch.Tensor:
                return torch.cat([t[e, :n] for e, n in enumerate(counts)])

            results[backend] = {
                "recv_count": res.recv_count, "layout_range": res.handle.layout_range,
                "src_rank": valid(res.handle.src_rank), "src_token_idx": valid(res.handle.src_token_idx),
                "rows": valid(data), "scales": None if scales is None else valid(scales), "combined": out.combined_x,
            }
    for key, want in results["torch"].items():
        got = results[MODEL_BACKEND][key]
        if key == "combined":
            assert got is not None and want is not None
            diff = (got.double() - want.double()).abs().max() if got.numel() else 0.0
            assert torch.allclose(got.double(), want.double(), rtol=1e-2, atol=1e-2), f"rank {rank} low-latency combine off by {diff}"
        else:
            _assert_same(got, want, f"rank {rank} low-latency {key}")


# ----------------------------------------------------------------------------------------------------
# protocol


def check_stream_order(case: Case) -> None:
    """After every operation that completes before returning, the caller's stream is ordered after every
    kernel the operation launched (on any stream); and every launch is ordered after the caller's work
    before the call (its inputs)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts, max_tokens = case.experts_per_rank * world, case.tokens + 4
    tracker = stream_tracker()
    caller = tracker.current()

    def completes(what: str, op: Callable[[], Any]) -> Any:
        inputs = tracker.record_launch(f"caller's writes before {what}", caller.cuda_stream)
        first = len(tracker.launches)
        result = op()
        launched = tracker.launches[first:]
        assert launched, f"{what}: launched no kernel"
        early = [launch for launch in launched if launch.ordered_after.get(caller.cuda_stream, 0) < inputs.index]
        assert not early, f"rank {rank} {what}: launched before the caller's stream reached the call: {early}"
        unseen = tracker.unseen_by(caller)
        assert not unseen, f"rank {rank} {what}: the caller's stream is not ordered after {unseen}"
        return result

    def waited(result: Any) -> Any:
        result.event.current_stream_wait()
        return result

    def hooked(result: Any) -> Any:
        result.hook()
        return result

    with Buffer(backend=MODEL_BACKEND) as buf:
        completes("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, num_experts))
        res = completes("dispatch", lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts))
        completes("dispatch (num_worst_tokens)", lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts,
                                                                   num_worst_tokens=(case.tokens + 2) * world))
        completes("cached dispatch", lambda: buf.dispatch(x, handle=res.handle))
        completes("combine", lambda: buf.combine(res.recv_x, res.handle, topk_weights=res.recv_topk_weights))
        completes("dispatch (async_finish) + current_stream_wait",
                  lambda: waited(buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts, async_finish=True)))
        completes("combine (async_finish) + current_stream_wait", lambda: waited(buf.combine(res.recv_x, res.handle, async_finish=True)))
        for use_fp8 in (False, True):
            ll = completes(f"low_latency_dispatch (use_fp8={use_fp8})",
                           functools.partial(buf.low_latency_dispatch, x, idx, max_tokens, num_experts, use_fp8=use_fp8))
            expert_rows = (ll.recv_x[0].float() if use_fp8 else ll.recv_x).bfloat16()
            completes("low_latency_combine", functools.partial(buf.low_latency_combine, expert_rows, idx, w, ll.handle))
        ll = completes("low_latency_dispatch + hook",
                       lambda: hooked(buf.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=False, return_recv_hook=True)))
        completes("low_latency_combine + hook", lambda: hooked(buf.low_latency_combine(ll.recv_x, idx, w, ll.handle, return_recv_hook=True)))


def check_previous_event_orders_the_computed_layout(case: Case) -> None:
    """A dispatch given ``previous_event`` but no layout computes the layout on the caller's stream; every kernel
    the communication stream then runs is ordered after that layout (it reads it), for exact and worst-case."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    tracker = stream_tracker()
    with Buffer(backend=MODEL_BACKEND) as buf:
        for worst in (0, (case.tokens + 2) * world):
            event = EventOverlap(event=torch.cuda.Event())
            event.event.record(tracker.current())
            first = len(tracker.launches)
            buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts, num_worst_tokens=worst,
                         previous_event=event)
            launched = tracker.launches[first:]
            layouts = [launch for launch in launched if launch.kernel == "layout"]
            assert len(layouts) == 1, [launch.kernel for launch in launched]
            layout = layouts[0]
            early = [launch.kernel for launch in launched[launched.index(layout) + 1:]
                     if launch.ordered_after.get(layout.stream, 0) < layout.index]
            assert not early, f"rank {rank} worst={worst}: {early} may run before the layout they read"


def check_grids_bounded_by_num_sms(case: Case) -> None:
    """On the simt kernels (the CUDA launchers themselves): every kernel each kind of call launches has at most
    ``num_sms`` blocks, so a call occupies at most ``num_sms`` SMs, for several ``num_sms``."""
    simt = simt_module()
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts, max_tokens = case.experts_per_rank * world, case.tokens + 4
    for num_sms in (1, 3, 8):
        with Buffer(backend=MODEL_BACKEND, num_sms=num_sms) as buf:
            first = simt.simt_launches()
            res = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
            buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts, num_worst_tokens=(case.tokens + 2) * world)
            buf.dispatch(per_token_cast_to_fp8(x), handle=res.handle)
            buf.combine(res.recv_x, res.handle, topk_weights=res.recv_topk_weights)
            ll = buf.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=True)
            buf.low_latency_combine(ll.recv_x[0].float().bfloat16(), idx, w, ll.handle)
            shapes = simt.simt_launch_shapes(first)
        assert len(shapes) >= 10, shapes
        over = [s for s in shapes if s[0] > num_sms]
        assert not over, f"rank {rank} num_sms={num_sms}: launches of (blocks, threads, smem) {over}"


class _KeepAlive(TorchDispatchMode):
    """Keeps every tensor an op makes in the body alive, as a CUDA graph's memory pool keeps its allocations."""

    def __init__(self, keep: list[torch.Tensor]) -> None:
        super().__init__()
        self.keep = keep

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.keep.extend(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@dataclass
class LaunchLog:
    """The kernel launches of a recorded body (launcher, arguments) and every tensor the body made."""

    launches: list[tuple[Callable[..., None], tuple]] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def views(self) -> set[tuple]:
        """The distinct ``PeerView`` tuples the protocol kernels were launched with."""
        return {args[0] for _, args in self.launches if args and isinstance(args[0], tuple)}

    def replay(self) -> None:
        """Launch every recorded kernel again, in order, with the same arguments (the same memory)."""
        for launch, args in self.launches:
            launch(*args)


@contextlib.contextmanager
def recorded_launches() -> Iterator[LaunchLog]:
    """The model's stand-in for capturing a CUDA graph: the body runs as usual, and the log gets every kernel
    launch it made, to launch again with :meth:`LaunchLog.replay`; every tensor the body makes stays alive as
    long as the log (as a graph's memory pool keeps its allocations), so those arguments stay valid."""
    log = LaunchLog()

    def recording(launch: Callable[..., None]) -> Callable[..., None]:
        def launch_and_record(*args: Any) -> None:
            launch(*args)
            log.launches.append((launch, args))
        return launch_and_record

    with contextlib.ExitStack() as stack:
        for name in LAUNCHERS:
            stack.enter_context(launcher_replaced(name, recording))
        stack.enter_context(_KeepAlive(log.tensors))
        yield log


def check_replayed_launches(case: Case, kind: str, replays: int = 2) -> None:
    """What a CUDA graph of a decode step needs from the kernels' arguments: the launches one step made, launched
    again on the same memory after new inputs were written into ``step.x`` (the step's torch ops in between run
    again too), give bitwise what an eager step on those inputs gives; eager steps on the same Buffer interleave
    with the replays. Host-side epochs or finished-block bases in the arguments would fail here."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    max_tokens = case.tokens + 4
    gen = torch.Generator().manual_seed(case.seed * 7919 + rank)
    with Buffer(backend=MODEL_BACKEND) as buf:
        graphed = make_step(kind, buf, x, idx, w, num_experts, max_tokens)
        eager = make_step(kind, buf, x, idx, w, num_experts, max_tokens)
        graphed()  # sizes the symmetric buffers, which a capture must not reallocate
        with recorded_launches() as dispatch_launches:
            graphed.dispatch()
        graphed.expert()
        with recorded_launches() as combine_launches:
            out = graphed.combine()
        views = dispatch_launches.views() | combine_launches.views()
        assert len(views) == 1, f"rank {rank}: the launches of one step took {len(views)} different views"
        buf.raise_if_failed()  # nothing recorded
        for round_ in range(replays):
            fresh = torch.randn(x.shape, generator=gen).to(x.dtype)
            graphed.x.copy_(fresh)
            dispatch_launches.replay()
            graphed.expert()
            combine_launches.replay()
            eager.x.copy_(fresh)
            _assert_same(out, eager(), f"rank {rank} {kind} replay {round_}")


def _dispatch_without_last_sender(buf: Buffer, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                                  num_experts: int) -> str:
    """Dispatch with the last rank's dispatch_send skipped; the CommTimeoutError's message (AssertionError if the
    dispatch completed)."""
    rank, missing = dist.get_rank(), dist.get_world_size() - 1
    skip_send = launcher_replaced("dispatch_send", lambda send: lambda *args: None) if rank == missing else contextlib.nullcontext()
    with skip_send:
        try:
            buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
        except CommTimeoutError as exc:
            return str(exc)
    raise AssertionError(f"rank {rank}: the dispatch completed without rank {missing}'s send")


def check_missing_sender_times_out(case: Case, timeout_s: float = 1.0) -> str:
    """The last rank's dispatch_send never runs: every rank's receive waits for its flag, the first wait to expire
    records that rank and sets every rank's abort word, the other waits (of every block and every rank) give up
    at once naming the rank that expired first, and the dispatch raises CommTimeoutError instead of hanging.
    Returns ``"expired"`` or ``"gave up"``: what this rank's error record says."""
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = world - 1
    x, idx, w = make_inputs(case, rank, world)
    # Left undestroyed: its buffers are inconsistent now. Four blocks: on the simt kernels a launch runs its blocks
    # one after another, so without the abort word each block would wait out the timeout in turn.
    buf = Buffer(backend=MODEL_BACKEND, timeout_s=timeout_s, num_sms=4)
    start = time.monotonic()
    message = _dispatch_without_last_sender(buf, x, idx, w, case.experts_per_rank * world)
    elapsed = time.monotonic() - start
    assert elapsed < 2.5 * timeout_s, f"rank {rank}: the timeout took {elapsed:.1f} s (blocks waited in turn?)"
    assert "(expected >= 1, observed 0)" in message, message
    if f"dispatch arrive flag of peer rank {missing} " in message:
        outcome = "expired"
    else:
        assert "its wait on the CUDA buffers expired first, so this rank's gave up" in message, message
        outcome = "gave up"
    try:  # what graph users call after replays
        buf.raise_if_failed()
    except CommTimeoutError as exc:
        assert "(expected >= 1, observed 0)" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: Buffer.raise_if_failed() missed the recorded timeout")
    # Its flags and counters may be inconsistent now: the next call raises the same error instead of launching.
    tracker = stream_tracker()
    launched = len(tracker.launches)
    try:
        buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=case.experts_per_rank * world)
    except CommTimeoutError as exc:
        assert "(expected >= 1, observed 0)" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: a dispatch ran on a buffer whose kernels had timed out")
    kernels = [launch.kernel for launch in tracker.launches[launched:]]
    assert "dispatch_send" not in kernels and "dispatch_recv" not in kernels, kernels
    return outcome


def _set_epochs(buf: Buffer, epoch: int) -> None:
    """As if every kernel of the protocol had run ``epoch`` times on every rank: this rank's epochs, flags and
    free slots all at ``epoch``. Collective; the Buffer must be idle (its last call synchronous)."""
    mem = buf._backend._mem  # type: ignore[union-attr]
    assert mem is not None, "the Buffer has not sized its symmetric buffers yet"
    header = raw(mem.base, dict(cuda_memory._ext().HEADER_SLOTS)["launch_failed"], torch.int32)
    dist.barrier()
    write_epochs(header, mem.num_ranks, epoch)
    dist.barrier()


def check_epochs_wrap(case: Case, timeout_s: float = 1.0) -> None:
    """Epochs are int32 and wrap after 2^31 calls. Started two calls before the wrap, dispatch and combine give
    bitwise the torch backend's results across it; then, at the wrap itself, a receive whose sender never ran
    still waits for that sender (a flag of epoch 2^31 - 1 has not reached epoch -2^31) and times out."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, idx, w = make_inputs(case, rank, world)
    num_experts = case.experts_per_rank * world
    int_max = 2**31 - 1
    with Buffer(backend=MODEL_BACKEND) as buf, Buffer(backend="torch") as reference:
        buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)  # sizes the buffers
        _set_epochs(buf, int_max - 2)
        for call in range(3):  # epochs 2^31 - 2, 2^31 - 1, -2^31
            got = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
            want = reference.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
            for name in ("recv_x", "recv_topk_idx", "recv_topk_weights"):
                _assert_same(getattr(got, name), getattr(want, name), f"rank {rank} call {call} {name}")
            back = buf.combine(got.recv_x, got.handle)[0]
            _assert_same(back, reference.combine(want.recv_x, want.handle)[0], f"rank {rank} call {call} combine")
    buf = Buffer(backend=MODEL_BACKEND, timeout_s=timeout_s, num_sms=2)  # left undestroyed: it times out
    buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts)
    _set_epochs(buf, int_max)
    message = _dispatch_without_last_sender(buf, x, idx, w, num_experts)
    assert f"(expected >= {-(2**31)}, observed {int_max})" in message, message


# ----------------------------------------------------------------------------------------------------
# the model is live: a planted fault must make the conformance checks fail


def _recv_src_rank_off_by_one(dispatch_recv: Callable[..., None]) -> Callable[..., None]:
    """dispatch_recv as modelled, then every written ``recv_src_rank`` plus one."""

    def faulty(*args: Any) -> None:
        dispatch_recv(*args)
        recv_src_rank, recv_counts, max_rows, num_ranks = args[6], args[7], args[8], args[0][2]
        rows = min(int(raw(recv_counts, num_ranks, torch.int32).sum()), max_rows)
        if recv_src_rank:
            raw(recv_src_rank, rows, torch.int32).add_(1)

    return faulty


def _no_dispatch_capacity(dispatch_send: Callable[..., None]) -> Callable[..., None]:
    """The host passes ``capacity_rows = 0`` to dispatch_send (a wrong launcher argument)."""

    def faulty(*args: Any) -> None:
        dispatch_send(*args[:13], 0, *args[14:])

    return faulty


FAULTS = {
    "recv_src_rank_off_by_one": ("dispatch_recv", _recv_src_rank_off_by_one),
    "dispatch_capacity_zero": ("dispatch_send", _no_dispatch_capacity),
}


def failure_under_fault(fault: str, check: Callable[..., None], *args: Any, **kwargs: Any) -> str | None:
    """Run ``check(*args, **kwargs)`` with ``fault`` planted in the model; the failure it raised, or None."""
    name, replace = FAULTS[fault]
    with launcher_replaced(name, replace):
        try:
            check(*args, **kwargs)
        except (AssertionError, BufferCapacityError, CommTimeoutError) as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return f"{type(exc).__name__} at {os.path.basename(where.filename)}:{where.lineno}: {str(exc)[:200]}"
    return None
