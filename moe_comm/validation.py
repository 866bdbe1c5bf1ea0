"""Argument checks for :class:`moe_comm.Buffer`: local checks and the cross-rank agreement step.

Local checks raise ``TypeError``/``ValueError`` naming the argument, the value received and the fix.
They are collected rather than raised at once, then every rank exchanges a small fixed-size header
(operation, error flag, hidden size, dtype, expert count, ...) so that a rank with bad input and a
rank whose arguments disagree with the others' make *every* rank raise, before any payload
collective that could otherwise leave some ranks waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_comm.collectives import StepContext, all_gather_rows, wait_all
from moe_comm.errors import PeerArgumentError
from moe_comm.fp8 import FP8_DTYPE, num_scale_blocks

__all__ = ["AgreementHeader", "agree", "check_topk", "check_x", "require"]

PAYLOAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_DTYPE_CODES = {
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float32: 3,
    torch.float64: 4,
    FP8_DTYPE: 5,
}
_OP_CODES = {"dispatch": 1, "combine": 2, "low_latency_dispatch": 3, "low_latency_combine": 4}


def require(condition: bool, exc_type: type[Exception], message: str) -> None:
    """Raise ``exc_type(message)`` unless ``condition``."""
    if not condition:
        raise exc_type(message)


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)}"


def check_x(
    x: object, allow_fp8: bool, argument: str = "x"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a payload: a ``[T, H]`` float tensor or, when allowed, ``(float8_e4m3fn [T, H], float32 [T, H/128])``.

    Returns:
        ``(x, scales or None)``, both contiguous.
    """
    if isinstance(x, tuple):
        require(allow_fp8, TypeError, f"{argument}: an FP8 (tensor, scales) tuple is not accepted here; pass a tensor")
        require(len(x) == 2, TypeError, f"{argument}: an FP8 payload is a pair (float8_e4m3fn [T, H], float32 scales [T, H/128]), got {len(x)} items")
        data, scales = x
        require(isinstance(data, torch.Tensor) and isinstance(scales, torch.Tensor), TypeError, f"{argument}: both items of the FP8 pair must be tensors")
        require(data.dtype == FP8_DTYPE, TypeError, f"{argument}[0]: expected torch.float8_e4m3fn, got {data.dtype}")
        require(data.dim() == 2, ValueError, f"{argument}[0]: expected [T, H], got {_describe(data)}")
        require(scales.dtype == torch.float32, TypeError, f"{argument}[1] (FP8 scales): expected torch.float32, got {scales.dtype}")
        expected = [data.shape[0], num_scale_blocks(data.shape[1])]
        require(
            list(scales.shape) == expected,
            ValueError,
            f"{argument}[1] (FP8 scales): expected shape {expected} (one scale per token per 128 channels), got {list(scales.shape)}",
        )
        require(scales.device == data.device, ValueError, f"{argument}: data on {data.device} but scales on {scales.device}")
        return data.contiguous(), scales.contiguous()
    require(isinstance(x, torch.Tensor), TypeError, f"{argument}: expected a torch.Tensor, got {type(x).__name__}")
    assert isinstance(x, torch.Tensor)
    require(
        x.dtype in PAYLOAD_DTYPES,
        TypeError,
        f"{argument}: dtype {x.dtype} is not supported; use bfloat16, float16, float32 or float64"
        + (", or an FP8 (tensor, scales) pair" if allow_fp8 else ""),
    )
    require(x.dim() == 2, ValueError, f"{argument}: expected a 2-D [T, H] tensor, got {_describe(x)}")
    return x.contiguous(), None


def check_topk(
    topk_idx: object,
    topk_weights: object,
    num_tokens: int,
    num_experts: int,
    check_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check ``topk_idx [T, K]`` int64 (ids in ``[-1, E)``) and ``topk_weights [T, K]`` float32."""
    idx = None
    if topk_idx is not None:
        require(isinstance(topk_idx, torch.Tensor), TypeError, f"topk_idx: expected a torch.Tensor, got {type(topk_idx).__name__}")
        assert isinstance(topk_idx, torch.Tensor)
        require(topk_idx.dtype == torch.int64, TypeError, f"topk_idx: expected torch.int64, got {topk_idx.dtype}")
        require(
            topk_idx.dim() == 2 and topk_idx.shape[0] == num_tokens,
            ValueError,
            f"topk_idx: expected [T={num_tokens}, K], got {_describe(topk_idx)}",
        )
        if check_values and topk_idx.numel():
            low, high = int(topk_idx.min()), int(topk_idx.max())
            require(
                low >= -1 and high < num_experts,
                ValueError,
                f"topk_idx: expert ids must lie in [-1, {num_experts}) (num_experts={num_experts}), got values in [{low}, {high}]",
            )
        idx = topk_idx.contiguous()
    weights = None
    if topk_weights is not None:
        require(isinstance(topk_weights, torch.Tensor), TypeError, f"topk_weights: expected a torch.Tensor, got {type(topk_weights).__name__}")
        assert isinstance(topk_weights, torch.Tensor)
        require(topk_weights.dtype == torch.float32, TypeError, f"topk_weights: expected torch.float32, got {topk_weights.dtype}")
        # Weights are sent for the receiver's local experts, which only topk_idx names (as in DeepEP).
        require(idx is not None, ValueError, "topk_weights: given without topk_idx; pass both or neither")
        assert idx is not None
        expected = [num_tokens, idx.shape[1]]
        require(
            list(topk_weights.shape) == expected,
            ValueError,
            f"topk_weights: expected shape {expected} like topk_idx, got {list(topk_weights.shape)}",
        )
        weights = topk_weights.contiguous()
    return idx, weights


@dataclass(frozen=True)
class AgreementHeader:
    """What every rank must agree on for one collective call. ``-1`` marks "not applicable"."""

    op: str
    hidden: int = -1
    dtype: torch.dtype | None = None
    num_experts: int = -1
    num_topk: int = -1
    has_weights: int = -1
    num_worst_tokens: int = -1
    expert_alignment: int = -1
    cached: int = -1
    max_tokens: int = -1
    async_finish: int = -1

    _NAMES = (
        ("hidden", "x (hidden size)"),
        ("dtype", "x (dtype)"),
        ("num_experts", "num_experts"),
        ("num_topk", "topk_idx (top-k width K)"),
        ("has_weights", "topk_weights (given or not)"),
        ("num_worst_tokens", "num_worst_tokens"),
        ("expert_alignment", "expert_alignment"),
        ("cached", "handle (cached dispatch or not)"),
        ("max_tokens", "num_max_dispatch_tokens_per_rank"),
        # A dispatch that completes asynchronously cannot count experts on arrival, so it runs a count exchange
        # that a synchronous one skips: ranks that differ here would differ in the collectives they start.
        ("async_finish", "async_finish"),
    )

    def values(self, error: bool) -> list[int]:
        """The header as integers: operation code, error flag, then the fields of ``_NAMES`` in order."""
        values = [_OP_CODES[self.op], int(error)]
        for name, _ in self._NAMES:
            value = getattr(self, name)
            if name == "dtype":
                value = -1 if value is None else _DTYPE_CODES.get(value, 0)
            values.append(int(value))
        return values

    def encode(self, error: bool) -> torch.Tensor:
        return torch.tensor(self.values(error), dtype=torch.int64)


def agree(
    ctx: StepContext,
    header: AgreementHeader,
    local_error: Exception | None,
    device: torch.device,
    rows_per_rank: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Exchange headers; raise on every rank if any rank failed its local checks or the ranks disagree.

    The rank whose own check failed re-raises its original exception; the others raise
    :class:`PeerArgumentError` quoting it. Disagreements raise ``ValueError`` naming the argument and
    every rank's value.

    Args:
        ctx: who is asking, for timeout errors.
        header: this rank's view of the call.
        local_error: this rank's own argument error, if any.
        device: where the exchange runs (the group's device).
        rows_per_rank: ``[R]`` integer counts this rank will send to each rank (a dispatch's
            ``num_tokens_per_rank``), carried in the same collective so the dispatch needs no separate
            count exchange. Every call sends R such slots (zeros when absent), so the rows of all ranks
            have the same width whatever each rank passed.

    Returns:
        ``[R, R]`` int64 on the host, entry ``[i, j]`` = rows rank i sends to rank j, when every rank gave
        ``rows_per_rank``; else ``None``.
    """
    world = dist.get_world_size(ctx.group)
    if world == 1:
        if local_error is not None:
            raise local_error
        return None if rows_per_rank is None else rows_per_rank.reshape(1, 1).to("cpu", torch.int64)
    # Built and read back as Python lists: one tensor in, one host copy out, no per-field tensor ops
    # (this step runs before every dispatch and combine, so its fixed cost counts).
    counts = [0] * (world + 1)
    if rows_per_rank is not None and local_error is None:
        sending = [int(v) for v in rows_per_rank.reshape(-1).tolist()]
        if len(sending) != world:
            raise ValueError(f"rows_per_rank: expected {world} counts (one per rank), got {len(sending)}")
        counts = [1] + sending
    values = header.values(local_error is not None) + counts
    row = torch.tensor(values, dtype=torch.int64).to(device).unsqueeze(0)
    table_t = torch.empty(world, len(values), dtype=torch.int64, device=device)
    wait_all(ctx, [all_gather_rows(ctx, table_t, row)], f"{header.op} argument agreement", spin=True)
    full = table_t.tolist()
    counts_table = [r[-(world + 1) :] for r in full]
    table = [r[: -(world + 1)] for r in full]
    failed = [r for r in range(world) if table[r][1] != 0]
    if failed:
        messages: list[object] = [None] * world
        dist.all_gather_object(messages, None if local_error is None else f"{type(local_error).__name__}: {local_error}", group=ctx.group)
        if local_error is not None:
            raise local_error
        first = failed[0]
        raise PeerArgumentError(f"rank {ctx.rank}: {header.op} stopped because rank {first} rejected its arguments: {messages[first]}")
    ops = [r[0] for r in table]
    if len(set(ops)) > 1:
        names = {code: name for name, code in _OP_CODES.items()}
        raise RuntimeError(
            f"rank {ctx.rank}: ranks called different operations at the same time: "
            + ", ".join(f"rank {r}: {names.get(op, op)}" for r, op in enumerate(ops))
            + "; every rank of the group must call the same Buffer methods in the same order"
        )
    for column, (name, argument) in enumerate(AgreementHeader._NAMES, start=2):
        values = [r[column] for r in table]
        if len(set(values)) > 1:
            if name == "dtype":
                codes = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
                values = [codes.get(v, v) for v in values]
            raise ValueError(f"{argument} differs between ranks in {header.op}: {values} (rank order); every rank must pass the same")
    if all(c[0] for c in counts_table):
        return torch.tensor([c[1:] for c in counts_table], dtype=torch.int64)
    return None
