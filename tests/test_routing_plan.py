"""The routing-plan kernel (csrc/kernels/layout.cu ``routing_plan_kernel``): what ``make_plan`` launches in place of
a prefix sum, ``nonzero`` and a fill, so that every kernel of a dispatch runs on at most ``num_sms`` SMs.

Run on CPU fibers (``moe_comm._C_simt``, the CUDA source itself, in every block and thread order) and as the kernel
model's transcription (tests/cuda_model/kernels.py), both against a torch reference: several chunks of the
block-wide scan (tokens past a multiple of the block), fewer blocks than ranks, a rank no token goes to, and the
list of sent tokens exact, padded with -1, and cut short."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch

from tests.cuda_model.kernels import DeviceMemory, KernelModel
from tests.cuda_model.simt import ORDERS, simt_built, simt_module

if importlib.util.find_spec("moe_comm._C") is None:
    pytest.skip("moe_comm._C is not built (no nvcc at install time)", allow_module_level=True)

# (tokens, ranks): no tokens, one, a block's worth and one more (the kernel's blocks are 256 threads), several chunks.
SHAPES = [(0, 2), (1, 1), (256, 3), (257, 8), (1000, 4)]


def _reference(in_rank: torch.Tensor, num_sent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``send_pos`` and the ``[num_sent]`` token list, from their definitions."""
    positions = torch.cumsum(in_rank.long(), dim=0) - 1
    send_pos = torch.where(in_rank, positions, -1).to(torch.int32)
    tokens = [t for r in range(in_rank.shape[1]) for t in range(in_rank.shape[0]) if in_rank[t, r]]
    listed = (tokens + [-1] * num_sent)[:num_sent]
    return send_pos, torch.tensor(listed, dtype=torch.int64)


def _inputs(tokens: int, ranks: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    in_rank = torch.rand(tokens, ranks, generator=gen) < 0.6
    if ranks > 2:
        in_rank[:, 1] = False  # a rank no token goes to
    return in_rank.contiguous()


def _run(routing_plan: Callable[..., None], in_rank: torch.Tensor, num_sent: int, num_sms: int) -> tuple[torch.Tensor, ...]:
    tokens, ranks = in_rank.shape
    send_pos = torch.full((tokens, ranks), 12345, dtype=torch.int32)
    listed = torch.full((num_sent,), 12345, dtype=torch.int64)
    recv_counts = torch.full((ranks,), 7, dtype=torch.int32)
    expert_counts = torch.full((37,), 7, dtype=torch.int32)
    ptr = lambda t: t.data_ptr() if t.numel() else 0  # noqa: E731
    routing_plan(ptr(in_rank), tokens, ranks, ptr(send_pos), ptr(listed), num_sent, recv_counts.data_ptr(),
                 expert_counts.data_ptr(), expert_counts.numel(), num_sms, 0)
    return send_pos, listed, torch.cat([recv_counts, expert_counts])


def _launcher(kernels: str) -> Callable[..., None]:
    """The CUDA source on CPU fibers (``"simt"``) or the kernel model's transcription (``"model"``)."""
    if kernels == "simt":
        if not simt_built():
            pytest.skip("moe_comm._C_simt is not built")
        return simt_module().routing_plan
    import moe_comm._C as real

    return KernelModel(real, DeviceMemory("/nonexistent"), on_launch=lambda kernel, stream: None).routing_plan


@pytest.mark.parametrize(("tokens", "ranks"), SHAPES)
@pytest.mark.parametrize(("kernels", "order"), [("simt", order) for order in sorted(ORDERS)] + [("model", "forward")])
def test_routing_plan_matches_its_definition(kernels: str, order: str, tokens: int, ranks: int) -> None:
    launcher = _launcher(kernels)
    in_rank = _inputs(tokens, ranks, seed=tokens + ranks)
    sent = int(in_rank.sum())
    if kernels == "simt":
        simt_module().simt_configure(ORDERS[order], 3)
    try:
        for num_sms in (1, 2, 20):  # 1 and 2: blocks loop over several ranks each
            for num_sent in (sent, tokens * ranks, max(sent - 5, 0)):  # exact, worst-case, cut short
                send_pos, listed, counts = _run(launcher, in_rank, num_sent, num_sms)
                want_pos, want_listed = _reference(in_rank, num_sent)
                what = f"T={tokens} R={ranks} num_sms={num_sms} num_sent={num_sent}"
                assert torch.equal(send_pos, want_pos), f"{what}: send_pos"
                assert torch.equal(listed, want_listed), f"{what}: send_token_idx"
                assert not bool(counts.any()), f"{what}: the receive's counts not zeroed"
    finally:
        if kernels == "simt":
            simt_module().simt_configure(ORDERS["forward"], 0)
