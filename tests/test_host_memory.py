"""moe_comm.host_memory: large CPU outputs on huge-page mappings behave as torch.empty/zeros tensors.

Single-process checks of the tensors themselves, then the portable backend's conformance checks at 3 gloo
ranks with every CPU output mapped (``host_memory.forced``), so the mapping path runs at the small shapes of
the test cases and not only above 32 MiB.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

from moe_comm import host_memory
from tests import conformance as conf
from tests.harness import pool_fixture

pool = pool_fixture(3)


def _is_mapped(t: torch.Tensor) -> bool:
    # torch.frombuffer storage is not resizable; torch.empty's is.
    return not t.untyped_storage().resizable()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_small_tensors_come_from_torch() -> None:
    t = host_memory.empty(16, 8, dtype=torch.float32)
    z = host_memory.zeros(16, 8, dtype=torch.float32)
    assert not _is_mapped(t) and not _is_mapped(z)
    assert torch.count_nonzero(z) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mappings with madvise: Linux")
def test_large_tensors_are_mapped_where_huge_pages_are_used(monkeypatch) -> None:
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: (True, "as if this host offered them"))
    rows = host_memory.min_bytes() // (2 * 1024) + 1
    t = host_memory.empty(rows, 1024, dtype=torch.bfloat16)
    assert _is_mapped(t) and t.is_contiguous() and t.shape == (rows, 1024) and t.dtype == torch.bfloat16
    below = host_memory.empty(rows // 2, 1024, dtype=torch.bfloat16)
    assert not _is_mapped(below)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.uint8], ids=str)
def test_mapped_tensors_behave_like_torch_ones(dtype: torch.dtype) -> None:
    with host_memory.forced():
        t = host_memory.empty(300, 7, dtype=dtype)
        z = host_memory.zeros(5, 3, 2, dtype=dtype)
    assert _is_mapped(t) and _is_mapped(z)
    assert t.shape == (300, 7) and t.dtype == dtype and t.is_contiguous()
    assert z.shape == (5, 3, 2) and torch.count_nonzero(z) == 0
    values = torch.randint(0, 100, (300, 7)).to(dtype)
    t.copy_(values)
    view = t[10:20, 2:5]
    view.fill_(3)
    values[10:20, 2:5] = 3
    assert torch.equal(t, values)
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), values)
    assert torch.equal(pickle.loads(pickle.dumps(t)), values)
    if dtype != torch.bfloat16:
        assert (t.numpy() == values.numpy()).all()
    shared = t.clone().share_memory_()
    assert shared.is_shared() and torch.equal(shared, values)


def test_mapped_tensors_work_under_autograd() -> None:
    with host_memory.forced():
        w = host_memory.empty(4, 4, dtype=torch.float64)
    w.copy_(torch.randn(4, 4, dtype=torch.float64))
    w.requires_grad_()
    (w * w).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, 2 * w.detach())


def test_a_mapping_is_released_with_its_last_view() -> None:
    size_mib = 64
    with host_memory.forced():
        t = host_memory.empty(size_mib << 20, dtype=torch.uint8)
    before = _rss_mib()
    t.fill_(1)
    view = t[1 << 20 :]
    del t
    gc.collect()
    assert _rss_mib() - before > 0.75 * size_mib  # the view keeps the mapping alive
    assert int(view[-1]) == 1
    del view
    gc.collect()
    assert _rss_mib() - before < 0.25 * size_mib


def test_growing_a_mapped_tensor_raises_instead_of_reallocating() -> None:
    with host_memory.forced():
        t = host_memory.empty(8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not resizable"):
        t.resize_(64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_never_mapped() -> None:
    with host_memory.forced():
        t = host_memory.empty(4, dtype=torch.float32, device="cuda")
        z = host_memory.zeros(4, dtype=torch.float32, device="cuda")
    assert t.is_cuda and z.is_cuda and torch.count_nonzero(z) == 0


def test_hosts_that_report_free_pages_keep_4k_pages(tmp_path, monkeypatch) -> None:
    device = tmp_path / "virtio0"
    device.mkdir()
    features = device / "features"
    monkeypatch.setattr(host_memory, "_BALLOON_FEATURES", str(tmp_path / "virtio*" / "features"))
    features.write_text("0110000" + "0" * 57 + "\n")  # no REPORTING bit
    assert not host_memory.reports_free_pages()
    features.write_text("0110010" + "0" * 57 + "\n")  # bit 5: VIRTIO_BALLOON_F_REPORTING
    assert host_memory.reports_free_pages()
    monkeypatch.setenv("MOE_COMM_HUGE_PAGES", "auto")
    host_memory.huge_pages_available.cache_clear()
    try:
        usable, why = host_memory.huge_pages_available()
        assert not usable and ("balloon" in why or "Linux" in why or "off" in why or "cannot read" in why)
        monkeypatch.setenv("MOE_COMM_HUGE_PAGES", "1")
        host_memory.huge_pages_available.cache_clear()
        usable, why = host_memory.huge_pages_available()
        assert "balloon" not in why
    finally:
        host_memory.huge_pages_available.cache_clear()


def _settings_in_subprocess(env: dict[str, str]) -> str:
    code = "from moe_comm import host_memory as h; print(h.huge_pages_available(), h.min_bytes())"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout


def test_environment_switches() -> None:
    off = _settings_in_subprocess({"MOE_COMM_HUGE_PAGES": "0"})
    assert "(False, 'disabled by MOE_COMM_HUGE_PAGES=0')" in off
    assert _settings_in_subprocess({"MOE_COMM_HUGE_PAGE_MIN_BYTES": "12345"}).split()[-1] == "12345"


# --- the portable backend with every CPU output mapped, on 3 ranks -----------------------------------


def _mapped_everywhere(check, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with host_memory.forced():
        check(*args, **kwargs)


def _outputs_are_mapped() -> None:
    import torch.distributed as dist

    from moe_comm import Buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    case = conf.Case(seed=21)
    x, idx, weights = conf.make_inputs(case, rank, world)
    with host_memory.forced():
        buf = Buffer(backend="torch")
        out = buf.dispatch(x, topk_idx=idx, topk_weights=weights, num_experts=case.experts_per_rank * world)
        combined, _, _ = buf.combine(out.recv_x, out.handle)
    assert _is_mapped(out.recv_x) and _is_mapped(combined)
    buf.destroy()


def test_outputs_are_mapped(pool) -> None:
    pool.run(_outputs_are_mapped)


@pytest.mark.parametrize("routing", ["uniform", "zipf", "empty_rank"])
def test_dispatch_combine_on_mappings(pool, routing: str) -> None:
    pool.run(_mapped_everywhere, conf.check_dispatch_combine, "torch", conf.Case(routing=routing, seed=22))


def test_fp8_cached_worst_case_and_low_latency_on_mappings(pool) -> None:
    pool.run(_mapped_everywhere, conf.check_fp8_dispatch, "torch", conf.Case(seed=23, hidden=256))
    pool.run(_mapped_everywhere, conf.check_cached_dispatch, "torch", conf.Case(routing="zipf", seed=24))
    pool.run(_mapped_everywhere, conf.check_worst_tokens, "torch", conf.Case(seed=25))
    pool.run(_mapped_everywhere, conf.check_low_latency, "torch", conf.Case(routing="masked", seed=26, hidden=128), True, False)
    pool.run(_mapped_everywhere, conf.check_deterministic, "torch", conf.Case(routing="zipf", seed=27, dtype=torch.bfloat16))
