"""GPU checks of the kernels in moe_comm._C (skipped without a CUDA device or the extension)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from moe_comm.backends import cuda as cb  # noqa: E402

if not cb.extension_status()[0]:
    pytest.skip(f"cuda extension unusable: {cb.extension_status()[1]}", allow_module_level=True)


def _reference_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    t = topk_idx.shape[0]
    per_expert = torch.zeros(num_experts, dtype=torch.int64)
    in_rank = torch.zeros(t, num_ranks, dtype=torch.bool)
    epr = num_experts // num_ranks
    idx = topk_idx.cpu()
    for e in idx[idx >= 0].tolist():
        per_expert[e] += 1
    valid = idx >= 0
    for r in range(num_ranks):
        in_rank[:, r] = ((idx // epr == r) & valid).any(dim=1)
    return in_rank.sum(0).int(), per_expert.int(), in_rank


@pytest.mark.parametrize("t,k,e,r,sms", [(0, 8, 256, 8, 4), (1, 1, 2, 2, 1), (4096, 8, 256, 8, 20), (777, 32, 64, 4, 3)])
def test_layout_matches_reference(t, k, e, r, sms):
    g = torch.Generator().manual_seed(t + k)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.int64)
    if t:
        idx[torch.rand(t, k, generator=g) < 0.1] = -1
    per_rank, per_expert, in_rank = cb.cuda_dispatch_layout(idx.cuda(), e, r, sms)
    torch.cuda.synchronize()
    ref = _reference_layout(idx, e, r)
    assert torch.equal(per_rank.cpu(), ref[0])
    assert torch.equal(per_expert.cpu(), ref[1])
    assert torch.equal(in_rank.cpu(), ref[2])


def test_layout_matches_torch_backend():
    """The device layout equals the portable backend's (the semantic reference)."""
    from moe_comm.layout import compute_dispatch_layout

    idx = torch.randint(0, 64, (300, 6), device="cuda")
    per_rank, per_expert, in_rank = cb.cuda_dispatch_layout(idx, 64, 4, 8)
    ref = compute_dispatch_layout(idx.cpu(), 64, 4)
    assert torch.equal(per_rank.cpu().int(), ref[0].cpu().int())
    assert torch.equal(per_expert.cpu().int(), ref[1].cpu().int())
    assert torch.equal(in_rank.cpu(), ref[2].cpu())


@pytest.mark.parametrize("nbytes,sms", [(16, 1), (1 << 20, 4), ((1 << 24) + 7, 32)])
def test_sm_copy(nbytes, sms):
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    cb.sm_copy(dst, src, sms)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)


def test_backend_reports_missing_kernels():
    usable, reason = cb.CudaBackend.available()
    assert not usable and "not implemented" in reason
