"""CPU-side checks of the CUDA extension: it imports when built, reports no device cleanly, and its
layout arithmetic matches Python; the registry reports ``cuda`` unusable here with a reason."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from moe_comm.backends.registry import available_backends
from tests.script_modules import load_script


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


@pytest.mark.parametrize("row_bytes,scales,topk", [(7168, 56, 8), (14336, 0, 8), (16, 0, 1), (4096, 32, 32), (256, 2, 0)])
def test_layout_arithmetic_matches_python(row_bytes, scales, topk):
    ext = _ext()
    rec = _align(row_bytes, 16) + _align(scales * 4, 16) + 2 * _align(topk * 4, 16) + 16
    assert ext.token_record_bytes(row_bytes, scales, topk) == rec
    assert ext.combine_record_bytes(row_bytes, topk) == _align(row_bytes, 16) + _align(topk * 4, 16)
    for r in (1, 2, 8):
        assert ext.symmetric_buffer_bytes(r, 1 << 20, 3 << 20) == ext.HEADER_BYTES + r * (4 << 20)
    slots = ext.HEADER_SLOTS
    assert len(set(slots.values())) == len(slots)
    assert max(slots.values()) * 4 < ext.HEADER_BYTES
    # Per-kernel arrays: the finished-block counters, then the epochs, one int32 per kernel id, not overlapping.
    assert sorted(ext.KERNEL_IDS.values()) == list(range(len(ext.KERNEL_IDS)))
    assert slots["blocks_done"] + len(ext.KERNEL_IDS) <= slots["epochs"]
    assert slots["epochs"] + len(ext.KERNEL_IDS) <= slots["launch_failed"]
    assert slots["launch_failed"] + len(ext.KERNEL_IDS) <= slots["abort"]
    assert (slots["abort"] + 1) * 4 <= ext.HEADER_BYTES
    assert ext.PHASES["peer_aborted"] not in {v for k, v in ext.PHASES.items() if k != "peer_aborted"}
    assert ext.MAX_RANKS == 8 and ext.MAX_TOPK == 32


def test_kernel_launchers_check_arguments_before_launching():
    """Bad pointers and sizes are named errors on the host (no device needed to reach them)."""
    ext = _ext()
    view = (1, 0, 2, 1 << 20, 1 << 20, 1000, 1)  # peers, rank, R, region bytes x2, timeout_ns, err
    with pytest.raises(RuntimeError, match="view.peers"):
        ext.dispatch_send((0, *view[1:]), 1, 0, 0, 0, 1, 1, 1, 4, 64, 0, 0, 1, 10, ext.NO_CAST, 1, 0)
    with pytest.raises(RuntimeError, match="row_bytes"):
        ext.dispatch_send(view, 1, 0, 0, 0, 1, 1, 1, 4, 24, 0, 0, 1, 10, ext.NO_CAST, 1, 0)
    # The fused FP8 cast (x = 16, aligned; H = 64 FP8 bytes): a bf16/fp16/fp32 source, no given scales, ceil(H/128).
    with pytest.raises(RuntimeError, match="cast_dtype"):
        ext.dispatch_send(view, 16, 0, 0, 0, 1, 1, 1, 4, 64, 1, 0, 1, 10, 3, 1, 0)
    with pytest.raises(RuntimeError, match="x_scales"):
        ext.dispatch_send(view, 16, 16, 0, 0, 1, 1, 1, 4, 64, 1, 0, 1, 10, 0, 1, 0)
    with pytest.raises(RuntimeError, match="num_scales"):
        ext.dispatch_send(view, 16, 0, 0, 0, 1, 1, 1, 4, 64, 2, 0, 1, 10, 2, 1, 0)
    with pytest.raises(RuntimeError, match="num_ranks"):
        ext.dispatch_recv((1, 0, 9, 1 << 20, 1 << 20, 1000, 1), 1, 0, 0, 0, 1, 1, 1, 0, 0, 4, 64, 0, 0, 10, False, 1, 0)
    with pytest.raises(RuntimeError, match="num_local_experts"):
        ext.dispatch_recv(view, 16, 0, 0, 0, 1, 1, 1, 16, 0, 4, 64, 0, 0, 10, False, 1, 0)
    with pytest.raises(RuntimeError, match="capacity_rows"):
        ext.combine_send(view, 1, 0, 1, 64, 0, 1 << 20, 1, 0)
    with pytest.raises(RuntimeError, match="hidden"):
        ext.combine_recv(view, 1, 1, 0, 0, 1, 0, 4, 3, 0, 10, 0, 1, 0)
    with pytest.raises(RuntimeError, match="timeout_ns"):
        ext.combine_recv((1, 0, 2, 1 << 20, 1 << 20, 0, 1), 1, 1, 0, 0, 1, 0, 4, 64, 0, 10, 0, 1, 0)
    # expert_major(x, scales, local_ids, src_idx, src_rank, out_x, out_scales, recv_count, out_src_idx, out_src_rank,
    #              layout_range, slot_of, row_of, N, row_bytes, S, K, E, R, num_sms, stream)
    args = [16, 0, 16, 16, 16, 16, 0, 16, 16, 16, 16, 16, 16, 4, 64, 0, 8, 2, 2, 1, 0]
    with pytest.raises(RuntimeError, match="num_topk"):
        ext.expert_major(*args[:16], 0, *args[17:])
    with pytest.raises(RuntimeError, match="layout_range"):
        ext.expert_major(*args[:10], 0, *args[11:])
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ext.expert_major(8, *args[1:])
    with pytest.raises(RuntimeError, match="scales"):
        ext.expert_major(*args[:15], 2, *args[16:])
    # low_latency_combine_send(view, x, slot_of, src_idx, src_rank, N, K, M, row_bytes, num_sms, stream)
    with pytest.raises(RuntimeError, match="exceed the combine region"):
        ext.low_latency_combine_send(view, 16, 16, 16, 16, 4, 8, 1 << 12, 14336, 1, 0)
    with pytest.raises(RuntimeError, match="num_topk"):
        ext.low_latency_combine_send(view, 16, 16, 16, 16, 4, 33, 4, 64, 1, 0)
    # low_latency_combine_recv(view, topk_idx, topk_weights, out, T, K, H, experts_per_rank, M, dtype, num_sms, stream)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.low_latency_combine_recv(view, 16, 16, 16, 2, 8, 64, 4, 4, 7, 1, 0)
    with pytest.raises(RuntimeError, match="num_tokens"):
        ext.low_latency_combine_recv(view, 16, 16, 16, 5, 8, 64, 4, 4, 0, 1, 0)
    with pytest.raises(RuntimeError, match="view: expected a 7-tuple"):
        ext.combine_send((1, 2), 1, 0, 1, 64, 0, 10, 1, 0)


def test_bad_argument_is_named_runtime_error():
    ext = _ext()
    with pytest.raises(RuntimeError, match="topk_idx"):
        ext.get_dispatch_layout(0, 4, 2, 8, 2, 1, 1, 1, 4, 0)
    with pytest.raises(RuntimeError, match="dst"):
        ext.sm_copy(0, 16, 16, 1, 0)
    # routing_plan(is_token_in_rank, T, R, send_pos, send_token_idx, num_sent, recv_counts, expert_counts, E_local,
    #              num_sms, stream)
    with pytest.raises(RuntimeError, match="send_pos"):
        ext.routing_plan(16, 4, 2, 0, 16, 8, 16, 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="send_token_idx"):
        ext.routing_plan(16, 4, 2, 16, 0, 8, 16, 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="expert_counts"):
        ext.routing_plan(16, 4, 2, 16, 16, 8, 16, 0, 4, 1, 0)
    with pytest.raises(RuntimeError, match="num_ranks"):
        ext.routing_plan(16, 4, 33, 16, 16, 8, 16, 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="num_sms"):
        ext.routing_plan(16, 4, 2, 16, 16, 8, 16, 0, 0, 0, 0)


def test_registry_reports_cuda_unusable_with_reason():
    report = available_backends()
    usable, reason = report["cuda"]
    if not torch.cuda.is_available():
        assert usable is False
        assert reason


_SPIN_SASS = """
        Function : spin_with_acquire
        /*0100*/                   LDG.E.STRONG.SYS R4, desc[UR4][R2.64] ;
        /*0110*/                   CCTL.IVALL ;
        /*0120*/                   ISETP.GE.AND P0, PT, R4, R5, PT ;
        /*0130*/              @!P0 BRA 0x100 ;
        /*0140*/                   LDG.E.STRONG.SYS R6, desc[UR4][R2.64] ;
        /*0150*/                   CCTL.IVALL ;
        /*0160*/                   EXIT ;
        Function : spin_relaxed_then_acquire
        /*0100*/                   LDG.E.STRONG.SYS R4, desc[UR4][R2.64] ;
        /*0110*/                   ISETP.GE.AND P0, PT, R4, R5, PT ;
        /*0120*/              @!P0 BRA 0x100 ;
        /*0130*/                   LDG.E.STRONG.SYS R6, desc[UR4][R2.64] ;
        /*0140*/                   CCTL.IVALL ;
        /*0150*/                   BRA 0x150 ;
"""


def test_spin_loop_detector_tells_an_invalidating_spin_from_a_relaxed_one():
    loops = load_script("check_spin_sass").spin_loops(_SPIN_SASS)
    # The trailing self-branch holds no load, so it is no spin.
    assert [(s.function, s.start, s.end, s.instructions, s.invalidates_l1) for s in loops] == [
        ("spin_with_acquire", 0x100, 0x130, 4, True),
        ("spin_relaxed_then_acquire", 0x100, 0x120, 3, False),
    ]


def test_compiled_spin_loops_do_not_invalidate_l1():
    """Every wait of every kernel spins on relaxed loads: no CCTL.IVALL (an SM-wide L1 invalidate) per iteration."""
    ext = _ext()
    checker = load_script("check_spin_sass")
    if checker.tools_dir() is None:
        pytest.skip("cuobjdump and nvdisasm not found (the test extra installs them on Linux)")
    loops = checker.spin_loops(checker.sass_of(Path(ext.__file__)))
    spinning = {loop.function for loop in loops}
    for kernel in [*ext.KERNEL_IDS, "barrier"]:  # each waits on its peers' flags; none found: the format changed
        assert any(f"{kernel}_kernel" in name for name in spinning), f"no spin loop found in {kernel}_kernel"
    assert [loop for loop in loops if loop.invalidates_l1] == []
