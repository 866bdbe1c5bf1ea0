"""Fake CUDA streams and events for the kernel model: no work is queued, but the ordering is recorded.

The model's kernels run at their launch, so nothing ever has to wait; what a GPU would get wrong is the
*order*: a stream reading outputs before the stream that computes them has been waited for. Each
:class:`FakeStream` therefore keeps a vector clock, for every stream, of how many of that stream's kernel
launches it is ordered after (its own included); ``wait_stream``, ``Event.record`` and ``wait_event`` merge
clocks exactly as CUDA orders work. :meth:`StreamTracker.unseen_by` then says which launches a stream
has NOT waited for, e.g. the caller's stream after a synchronous ``Buffer.dispatch``.

Stream handles (``cuda_stream``) are small integers, 0 for the default stream; the kernel model attributes
each launch to the stream whose handle the host passed, so a wrong or unknown handle is caught.

Timing events (``enable_timing=True``) note the wall clock at ``record``; ``elapsed_time`` is the host time
between two records, i.e. what the model's synchronous kernels took to run on the host (not a GPU time).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakeEvent", "FakeStream", "Launch", "StreamTracker"]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its stream, its index among that stream's launches (1, 2, ...) and the clock of its
    stream at launch time (which launches of other streams it is ordered after)."""

    kernel: str
    stream: int
    index: int
    ordered_after: dict[int, int] = field(repr=False)


class StreamTracker:
    """Every fake stream of this process, the current-stream stack and the log of launches."""

    def __init__(self) -> None:
        self.streams: dict[int, FakeStream] = {}
        self.launches: list[Launch] = []
        self.default = FakeStream(self)
        self._current: list[FakeStream] = [self.default]

    def register(self, stream: FakeStream) -> int:
        handle = len(self.streams)
        self.streams[handle] = stream
        return handle

    def current(self) -> FakeStream:
        return self._current[-1]

    @contextlib.contextmanager
    def use(self, stream: FakeStream | None) -> Iterator[FakeStream | None]:
        """``torch.cuda.stream(stream)``: make ``stream`` current in the body (``None``: change nothing)."""
        if stream is None:
            yield None
            return
        self._current.append(stream)
        try:
            yield stream
        finally:
            self._current.pop()

    def record_launch(self, kernel: str, handle: int) -> Launch:
        """A kernel (or any stream work worth tracking) was issued on the stream with ``handle``."""
        assert handle in self.streams, f"{kernel} launched on stream handle {handle}, which no stream of this process has"
        stream = self.streams[handle]
        stream.clock[handle] += 1
        launch = Launch(kernel, handle, stream.clock[handle], dict(stream.clock))
        self.launches.append(launch)
        return launch

    def unseen_by(self, stream: FakeStream) -> list[Launch]:
        """The launches ``stream`` is not ordered after."""
        return [launch for launch in self.launches if stream.clock.get(launch.stream, 0) < launch.index]


def _merge(into: dict[int, int], other: dict[int, int]) -> None:
    for handle, count in other.items():
        into[handle] = max(into.get(handle, 0), count)


class FakeStream:
    """``torch.cuda.Stream`` (``device`` and ``priority`` are accepted and ignored)."""

    def __init__(self, tracker: StreamTracker, device: Any = None, priority: int = 0) -> None:
        self.cuda_stream = tracker.register(self)
        self.clock: dict[int, int] = {self.cuda_stream: 0}
        self._tracker = tracker

    def __repr__(self) -> str:
        return f"FakeStream({self.cuda_stream})"

    def wait_stream(self, other: FakeStream) -> None:
        _merge(self.clock, other.clock)

    def wait_event(self, event: FakeEvent) -> None:
        _merge(self.clock, event.clock)

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event if event is not None else FakeEvent(self._tracker)
        event.record(self)
        return event

    def synchronize(self) -> None:
        """Nothing to wait for: the model's kernels completed at their launch."""

    def query(self) -> bool:
        return True


class FakeEvent:
    """``torch.cuda.Event`` (``blocking`` and ``interprocess`` are accepted and ignored)."""

    def __init__(self, tracker: StreamTracker, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.clock: dict[int, int] = {}
        self._tracker = tracker
        self._enable_timing = enable_timing
        self._recorded_ns: int | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.clock = dict((stream if stream is not None else self._tracker.current()).clock)
        self._recorded_ns = time.perf_counter_ns()

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream if stream is not None else self._tracker.current()).wait_event(self)

    def synchronize(self) -> None:
        """Nothing to wait for: the model's kernels completed at their launch."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: FakeEvent) -> float:
        """Milliseconds of host wall clock from this event's record to ``end_event``'s; raises where
        ``cudaEventElapsedTime`` fails (an event made without ``enable_timing``, or not recorded)."""
        if not (self._enable_timing and end_event._enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._recorded_ns is None or end_event._recorded_ns is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end_event._recorded_ns - self._recorded_ns) / 1e6
