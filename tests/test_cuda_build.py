"""CPU-side checks of the CUDA extension: it imports when built, reports no device cleanly, and its
layout arithmetic matches Python; the registry reports ``cuda`` unusable here with a reason."""

from __future__ import annotations

import importlib

import pytest
import torch

from moe_comm.backends.registry import available_backends


def _ext():
    try:
        return importlib.import_module("moe_comm._C")
    except ImportError:
        pytest.skip("moe_comm._C not built (no nvcc at install time)")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def test_extension_reports_architectures_and_device_status():
    ext = _ext()
    assert "sm_" in ext.compiled_architectures()
    status = ext.device_status()
    assert isinstance(status, str) and status
    if not torch.cuda.is_available():
        assert status != "ok"
        assert ext.device_count() == 0


@pytest.mark.parametrize("hidden_bytes,scales,topk", [(7168, 56, 8), (14336, 0, 8), (16, 0, 1), (4096, 32, 32)])
def test_layout_arithmetic_matches_python(hidden_bytes, scales, topk):
    ext = _ext()
    rec = _align(hidden_bytes, 16) + _align(scales * 4, 16) + _align(topk * 8, 16) + _align(topk * 4, 16) + 16
    assert ext.token_record_bytes(hidden_bytes, scales, topk) == rec
    for r, e in [(2, 8), (8, 256)]:
        hdr = _align(r * r * 4, 128) + _align(r * e * 4, 128) + _align(r * r * 8, 128)
        assert ext.header_bytes(r, e) == hdr
        assert ext.symmetric_buffer_bytes(r, e, 4096, hidden_bytes, scales, topk) == hdr + r * _align(4096 * rec, 128)


def test_bad_argument_is_named_runtime_error():
    ext = _ext()
    with pytest.raises(RuntimeError, match="topk_idx"):
        ext.get_dispatch_layout(0, 4, 2, 8, 2, 1, 1, 1, 4, 0)
    with pytest.raises(RuntimeError, match="dst"):
        ext.sm_copy(0, 16, 16, 1, 0)


def test_registry_reports_cuda_unusable_with_reason():
    report = available_backends()
    usable, reason = report["cuda"]
    if not torch.cuda.is_available():
        assert usable is False
        assert reason
