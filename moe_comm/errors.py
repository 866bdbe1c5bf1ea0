"""Exceptions raised by the runtime, beyond the ``ValueError``/``TypeError`` of bad arguments."""

from __future__ import annotations

__all__ = ["CommTimeoutError", "PeerArgumentError"]


class CommTimeoutError(TimeoutError):
    """A bounded wait expired. The message names the rank, the operation, the step and the peers.

    After this error the process group may be unusable (gloo aborts pending work); destroy the
    :class:`moe_comm.Buffer` and the group.
    """

    def __init__(self, rank: int, op: str, step: str, timeout_s: float, detail: str = "") -> None:
        self.rank = rank
        self.op = op
        self.step = step
        self.timeout_s = timeout_s
        extra = f"; {detail}" if detail else ""
        super().__init__(f"rank {rank}: {op} timed out after {timeout_s:g} s waiting for {step}{extra}")


class PeerArgumentError(ValueError):
    """Another rank rejected its arguments, so this rank stops too instead of waiting for it.

    The message quotes the other rank's error. Raised on every rank that was itself fine.
    """
