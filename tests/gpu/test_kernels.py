"""GPU checks of the kernels in moe_comm._C (skipped without a CUDA device or the extension)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.gpu import skip_module_without_cuda

pytestmark = pytest.mark.gpu

skip_module_without_cuda()

from moe_comm.backends import cuda as cb  # noqa: E402


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


def test_backend_reports_usable():
    usable, reason = cb.CudaBackend.available()
    assert usable, reason


def _barrier_setup(n: int):
    counters = [torch.zeros(n, dtype=torch.int32, device="cuda") for _ in range(n)]
    table = torch.tensor([c.data_ptr() for c in counters], dtype=torch.int64, device="cuda")
    err = torch.zeros(cb.extension().timeout_record_bytes() // 4, dtype=torch.int32).pin_memory()
    return counters, table, err


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_barrier_all_ranks_concurrent(n):
    """The n ranks' one-block barrier kernels run at once, on n streams of this process."""
    if n > 1 and os.environ.get("CUDA_LAUNCH_BLOCKING", "0") != "0":
        # Each launch returns only once its kernel has finished, so the first rank's barrier would wait out its
        # timeout for ranks not launched yet. (The dispatch and combine emulators need no such concurrency.)
        pytest.skip("CUDA_LAUNCH_BLOCKING serialises the ranks' launches")
    ext = cb.extension()
    counters, table, err = _barrier_setup(n)
    streams = [torch.cuda.Stream() for _ in range(n)]
    torch.cuda.synchronize()
    for r, s in enumerate(streams):
        ext.barrier(table.data_ptr(), r, n, 1, 2_000_000_000, err.data_ptr(), s.cuda_stream)
    torch.cuda.synchronize()
    assert int(err[0]) == 0, err.tolist()
    for c in counters:
        assert c.tolist() == [1] * n


def test_barrier_missing_peer_times_out_with_record():
    ext = cb.extension()
    counters, table, err = _barrier_setup(2)
    torch.cuda.synchronize()
    ext.barrier(table.data_ptr(), 0, 2, 1, 10_000_000, err.data_ptr(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    flag, rank, peer, phase = err[:4].tolist()
    assert (flag, rank, peer, phase) == (1, 0, 1, 1)
    expected, observed = err[4:].view(torch.int64).tolist()
    assert (expected, observed) == (1, 0)


def test_null_pointer_named():
    with pytest.raises(RuntimeError, match="counters_table"):
        cb.extension().barrier(0, 0, 2, 1, 100, 1, 0)
