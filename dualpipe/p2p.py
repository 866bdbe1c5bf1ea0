"""Point-to-point transfers of one pipeline step: variable shapes without a shape list, receives posted early.

A *transfer* is one ``SEND_*``/``RECV_*`` pair of the lowered plan: a tuple of tensors (entries may be
``None``) from a sending stage to the next (``"F"``) or previous (``"B"``) one. Its description is a
fixed-size int64 header, ``[count, layout flag, slots...]`` with per tensor its dtype code (-1: ``None``),
dim count and padded shape. The *predicted* layout of a transfer, which sender and receiver both know, is:

- on a channel (same direction, same sending stage) that carried a transfer before this step (a pipeline keeps
  its :class:`Layouts` from step to step): the layout of that channel's last transfer before the step, for
  every transfer of the step;
- otherwise (a channel's first step): the layout of the previous transfer on the channel in this step, if any.

Then the transfer travels as:

- layout as predicted (every transfer but a pipeline's first on each channel, when shapes do not vary): one
  message, the header and the tensors' bytes packed together (each tensor 64-byte aligned); the receiver
  posted one buffer of that size in advance and takes the tensors as views of it;
- otherwise: the header, padded to the size of the buffer the receiver posted for its prediction (none: the
  bare header); then, on a side tag, past ``_HEADER_SLOTS`` tensors a second header with the remaining slots,
  and the packed tensors, into buffers the receiver posts once it has read the header.

With ``lookahead`` (gloo on CPU), receives are posted ahead of the plan's ``RECV`` that waits on them, in the
plan's order per peer, as far as their predictions are known: from a channel's second step on, all of the
step's receives from a peer are posted when it starts (``max_ahead`` limits them per channel); in a channel's
first step, one at a time. A transfer thus finds its receive posted when it is sent and proceeds while this
rank computes: gloo sends a message's bytes only once its receive is posted, so a receive posted late costs
the transfer a round trip through both ranks' transport threads. On the 2-core VMs (2026-12-03, DualPipeV
against PyTorch's ``ScheduleDualPipeV``, same process group, interleaved): with one receive outstanding per
channel our step took 1.05-1.16x as long as PyTorch's at 2 ranks and 8 chunks; with four, 0.96-1.02x; with
all of them, 0.93-1.01x; at 4 ranks and 16 chunks four gave 1.00-1.10x, eight 0.97-1.03x, all 0.90-1.00x.
The price is memory: the step's received tensors are allocated when it starts, as much again as the sends,
which the senders keep until the step ends. Main-tag messages between two ranks match in the order posted
(the order the validator proved consistent), side-tag messages likewise among themselves. NCCL runs without
lookahead (and ignores tags; its receives are posted one at a time, in order), since a receive posted early
would hold back later operations on the same communicator stream.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Layouts", "Transport", "TransferId"]

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,
]
_MAX_DIMS = 8
_SLOT_LEN = 2 + _MAX_DIMS  # per tensor: dtype code (-1: None), dim count, shape padded to _MAX_DIMS
_HEADER_SLOTS = 8  # tensors the fixed-size header describes; a transfer of more sends the rest in a second header
_HEADER_LEN = 2 + _HEADER_SLOTS * _SLOT_LEN  # tensor count, layout flag, slots
_SIDE_TAG = 1  # what a receiver cannot have predicted (second header, unpredicted payload) travels on this tag

Spec = tuple[torch.dtype, tuple[int, ...]] | None
TransferId = tuple[str, int, int]  # ("F" or "B", sending stage, micro-batch)


def _spec(t: torch.Tensor | None) -> Spec:
    return None if t is None else (t.dtype, tuple(t.shape))


def _encode_slots(specs: Sequence[Spec]) -> list[int]:
    words: list[int] = []
    for spec in specs:
        if spec is None:
            words += [-1, 0] + [0] * _MAX_DIMS
            continue
        dtype, shape = spec
        if len(shape) > _MAX_DIMS:
            raise ValueError(f"pipeline tensors may have at most {_MAX_DIMS} dimensions, got {len(shape)}")
        if dtype not in _DTYPES:
            raise ValueError(f"pipeline tensors must have one of the dtypes {_DTYPES}, got {dtype}")
        words += [_DTYPES.index(dtype), len(shape), *shape] + [0] * (_MAX_DIMS - len(shape))
    return words


def _decode_slots(words: Sequence[int]) -> list[Spec]:
    specs: list[Spec] = []
    for base in range(0, len(words), _SLOT_LEN):
        code, dims = words[base], words[base + 1]
        specs.append(None if code < 0 else (_DTYPES[code], tuple(words[base + 2 : base + 2 + dims])))
    return specs


def encode_header(specs: Sequence[Spec], as_predicted: bool) -> torch.Tensor:
    """``_HEADER_LEN`` words, then (more than ``_HEADER_SLOTS`` tensors) the remaining slots: the second header."""
    words = [len(specs), int(as_predicted)] + _encode_slots(specs)
    words += [-1] * (_HEADER_LEN - len(words))
    return torch.tensor(words, dtype=torch.int64)


def decode_header(words: Sequence[int]) -> tuple[int, bool, list[Spec]]:
    """``(tensor count, as_predicted, specs of the first min(count, _HEADER_SLOTS) tensors)``."""
    count = words[0]
    return count, bool(words[1]), _decode_slots(words[2 : 2 + min(count, _HEADER_SLOTS) * _SLOT_LEN])


_ALIGN = 64  # byte alignment of each tensor in a packed message
_HEADER_BYTES = -(-_HEADER_LEN * 8 // _ALIGN) * _ALIGN


def _nbytes(spec: Spec) -> int:
    if spec is None:
        return 0
    dtype, shape = spec
    n = dtype.itemsize
    for d in shape:
        n *= d
    return -(-n // _ALIGN) * _ALIGN


def _packed_size(layout: Sequence[Spec] | None) -> int:
    return sum(_nbytes(s) for s in layout) if layout is not None else 0


def _pack(
    header: torch.Tensor | None, tensors: Sequence[torch.Tensor | None], size: int, device: torch.device
) -> torch.Tensor:
    """One uint8 message of ``size`` bytes: the header (if given, padded to ``_HEADER_BYTES``), then the tensors."""
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    offset = 0
    if header is not None:
        buf[: header.numel() * 8].copy_(header.view(torch.uint8))
        offset = _HEADER_BYTES
    for t in tensors:
        if t is None:
            continue
        n = t.numel() * t.element_size()
        buf[offset : offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += _nbytes((t.dtype, tuple(t.shape)))
    return buf


def _unpack(buf: torch.Tensor, layout: Sequence[Spec], offset: int) -> list[torch.Tensor | None]:
    """Views of the tensors packed in ``buf`` from byte ``offset``."""
    out: list[torch.Tensor | None] = []
    for spec in layout:
        if spec is None:
            out.append(None)
            continue
        dtype, shape = spec
        n = dtype.itemsize
        for d in shape:
            n *= d
        out.append(buf[offset : offset + n].view(dtype).view(shape))
        offset += _nbytes(spec)
    return out


@dataclass
class Layouts:
    """The last layout sent and received on each channel ``(direction, sending stage)``: the predictions.

    A pipeline keeps one across steps, so a step's first transfer on each channel is predicted from the
    previous step's last (both ranks update their copies in the same message order, so they agree).
    """

    sent: dict[tuple[str, int], list[Spec]] = field(default_factory=dict)
    received: dict[tuple[str, int], list[Spec]] = field(default_factory=dict)


@dataclass
class _Posted:
    buffer: torch.Tensor  # header (+ predicted payload) bytes
    work: dist.Work
    predicted: list[Spec] | None


class Transport:
    """One step's transfers for one rank.

    Args:
        group: the process group; peers are ranks of it.
        device: where received tensors go.
        timeout_s: bound on every wait.
        rank: this rank's plan rank (for messages).
        receives: this rank's receives in plan order, each ``(peer, transfer id)``.
        lookahead: post each receive as early as the per-peer message order allows (gloo).
        layouts: the layout predictions to start from and update (default: none, fresh for this step).
        max_ahead: with ``lookahead``, most receives outstanding per channel predicted from before the step
            (default ``None``: no limit).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device,
        timeout_s: float,
        rank: int,
        receives: Iterable[tuple[int, TransferId]],
        lookahead: bool,
        layouts: Layouts | None = None,
        max_ahead: int | None = None,
    ) -> None:
        self.group = group
        self.max_ahead = max_ahead
        self.device = device
        self.timeout_s = timeout_s
        self.rank = rank
        self.lookahead = lookahead
        self._order: dict[int, deque[TransferId]] = {}  # per peer, the receives not yet taken, in plan order
        for peer, tid in receives:
            self._order.setdefault(peer, deque()).append(tid)
        self._unposted = {peer: deque(queue) for peer, queue in self._order.items()}  # per peer, not yet posted
        self._posted: dict[TransferId, _Posted] = {}
        self._outstanding: dict[tuple[str, int], int] = {}  # per channel, receives posted and not yet taken
        layouts = layouts if layouts is not None else Layouts()
        self._sent_layout = layouts.sent
        self._received_layout = layouts.received
        # Channels with a layout known before the step predict every transfer of the step from it, so their
        # receives need not wait for the previous one on the channel.
        self._step_sent = dict(layouts.sent)
        self._step_received = dict(layouts.received)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        if lookahead:
            for peer in self._unposted:
                self._post_ahead(peer)

    # --- waiting -----------------------------------------------------------------------------------
    def wait(self, work: dist.Work, what: str) -> None:
        if self.device.type == "cuda":
            deadline = time.monotonic() + self.timeout_s
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"dualpipe rank {self.rank}: timed out after {self.timeout_s:g} s waiting for {what}"
                    )
                time.sleep(20e-6)
            work.wait()
            return
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise TimeoutError(
                f"dualpipe rank {self.rank}: timed out after {self.timeout_s:g} s waiting for {what}: {exc}"
            ) from exc

    # --- sending -----------------------------------------------------------------------------------
    def send(self, peer: int, tid: TransferId, tensors: Sequence[torch.Tensor | None]) -> None:
        channel = (tid[0], tid[1])
        layout = [_spec(t) for t in tensors]
        predicted = self._step_sent.get(channel, self._sent_layout.get(channel))
        as_predicted = predicted == layout
        header = encode_header(layout, as_predicted).to(self.device)
        if as_predicted:
            messages = [_pack(header[:_HEADER_LEN], tensors, _HEADER_BYTES + _packed_size(layout), self.device)]
        else:  # fill the buffer the peer posted for its prediction, then what it cannot have predicted
            messages = [_pack(header[:_HEADER_LEN], (), _HEADER_BYTES + _packed_size(predicted), self.device)]
            if header.numel() > _HEADER_LEN:
                messages.append(header[_HEADER_LEN:])
            if _packed_size(layout):
                messages.append(_pack(None, tensors, _packed_size(layout), self.device))
        self._sent_layout[channel] = layout
        for i, tensor in enumerate(messages):  # the first on the main tag, anything more on the side tag
            self._sends.append((dist.isend(tensor, peer, group=self.group, tag=_SIDE_TAG if i else 0), tensor))

    def finish(self) -> None:
        """Wait for every send of the step."""
        for work, _keep in self._sends:
            self.wait(work, "a send to complete")
        self._sends.clear()

    # --- receiving ---------------------------------------------------------------------------------
    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> dist.Work:
        return dist.irecv(tensor, peer, group=self.group, tag=tag)

    def _post_next(self, peer: int) -> None:
        """Post the first receive from ``peer`` not yet posted, sized by its predicted layout."""
        tid = self._unposted[peer].popleft()
        channel = (tid[0], tid[1])
        predicted = self._step_received.get(channel, self._received_layout.get(channel))
        buffer = torch.empty(_HEADER_BYTES + _packed_size(predicted), dtype=torch.uint8, device=self.device)
        self._posted[tid] = _Posted(buffer, self._irecv(buffer, peer), predicted)
        self._outstanding[channel] = self._outstanding.get(channel, 0) + 1

    def _post_ahead(self, peer: int) -> None:
        """Post receives from ``peer`` in plan order while their prediction is known, up to the first one whose
        channel already has as many outstanding as it may: ``max_ahead`` (default: all) on channels predicted from
        before the step, else one (the next one's layout, its prediction, is not known yet)."""
        unposted = self._unposted[peer]
        while unposted:
            channel = (unposted[0][0], unposted[0][1])
            if channel in self._step_received:
                if self.max_ahead is not None and self._outstanding.get(channel, 0) >= self.max_ahead:
                    break
            elif self._outstanding.get(channel, 0):
                break
            self._post_next(peer)

    def recv(self, peer: int, tid: TransferId, what: str) -> tuple[torch.Tensor | None, ...]:
        """Receive transfer ``tid`` from ``peer`` (it must be the next one the plan receives from that peer)."""
        queue = self._order.get(peer)
        if not queue or queue[0] != tid:
            raise RuntimeError(
                f"dualpipe rank {self.rank}: receive {tid} out of plan order (expected {queue[0] if queue else None})"
            )
        if tid not in self._posted:
            self._post_next(peer)
        posted = self._posted.pop(tid)
        self.wait(posted.work, what)
        count, as_predicted, layout = decode_header(posted.buffer[: _HEADER_LEN * 8].view(torch.int64).tolist())
        payload: dist.Work | None = None
        if as_predicted:
            if posted.predicted is None or len(posted.predicted) != count or posted.predicted[: len(layout)] != layout:
                raise RuntimeError(
                    f"dualpipe rank {self.rank}: {what}: the sender's layout prediction disagrees with this rank's"
                )
            layout = posted.predicted
            received = _unpack(posted.buffer, layout, _HEADER_BYTES)
        else:  # the rest follows on the side tag
            if count > _HEADER_SLOTS:
                spill = torch.empty((count - _HEADER_SLOTS) * _SLOT_LEN, dtype=torch.int64, device=self.device)
                self.wait(self._irecv(spill, peer, _SIDE_TAG), what)
                layout += _decode_slots(spill.tolist())
            size = _packed_size(layout)
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            if size:
                payload = self._irecv(buffer, peer, _SIDE_TAG)
            received = _unpack(buffer, layout, 0)
        channel = (tid[0], tid[1])
        self._received_layout[channel] = layout
        self._outstanding[channel] -= 1
        queue.popleft()
        if self.lookahead:
            self._post_ahead(peer)
        if payload is not None:
            self.wait(payload, what)
        return tuple(received)
