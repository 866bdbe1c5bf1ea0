"""Exceptions raised by the runtime, beyond the ``ValueError``/``TypeError`` of bad arguments."""

from __future__ import annotations

__all__ = ["BufferCapacityError", "CommTimeoutError", "PeerArgumentError"]


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


class BufferCapacityError(RuntimeError):
    """A kernel found more rows than the receive region it writes into holds (a sizing bug, not a timeout).

    The message names the rank, the operation, the peer, the position or count and the capacity. The
    buffers are inconsistent afterwards: destroy the :class:`moe_comm.Buffer`.
    """

    def __init__(self, rank: int, op: str, peer: int, observed: int, capacity: int) -> None:
        self.rank = rank
        self.op = op
        self.peer = peer
        super().__init__(
            f"rank {rank}: {op} overflowed a receive region (peer {peer}): position or count {observed} >= capacity "
            f"{capacity} rows; the CUDA symmetric buffer is now inconsistent: destroy the Buffer"
        )
