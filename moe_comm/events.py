"""``EventOverlap``: what ``async_finish=True`` returns, a completion to wait on later; and whether the current
CUDA stream is capturing a graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["EventOverlap", "is_capturing"]


def is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (always False on a torch without CUDA)."""
    return torch.backends.cuda.is_built() and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class EventOverlap:
    """A pending completion of an asynchronous dispatch or combine.

    Wraps a CUDA event recorded on the communication stream, or a callable that waits for outstanding
    ``torch.distributed`` work; with neither (CPU, nothing pending) every method is a no-op. Tensors
    passed as ``extra_tensors`` are kept alive until the event is waited on, so their memory cannot be
    reused while the communication still reads it.

    Args:
        event: a ``torch.cuda.Event`` recorded where the operation ends, or ``None``.
        waiter: a callable that blocks until the operation's host-visible work is complete, or ``None``.
        extra_tensors: tensors to keep alive until the wait.
    """

    def __init__(
        self,
        event: torch.cuda.Event | None = None,
        waiter: Callable[[], None] | None = None,
        extra_tensors: Sequence[Any] = (),
    ) -> None:
        self.event = event
        self._waiter = waiter
        self._extra_tensors: tuple[Any, ...] | None = tuple(extra_tensors)

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the operation (and, for host work, block until it is done)."""
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter()
        if self.event is not None and torch.cuda.is_available():
            torch.cuda.current_stream().wait_event(self.event)
        self._extra_tensors = None

    def is_pending(self) -> bool:
        """Whether :meth:`current_stream_wait` still has work to wait for."""
        return self._waiter is not None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()
