"""The single-GPU emulator and the CUDA bench suite, on CPUs, against the kernel model (tests/cuda_model).

``MultiRankEmulator`` (moe_comm/backends/cuda_emulator.py) runs R ranks of the ``cuda`` backend in one process
and ``python -m moe_comm.bench --suite cuda`` (moe_comm/bench/cuda.py) is built on it; both first meet a GPU in
scripts/gpu_check.sh. Here their host code runs unchanged, in one rank process (a RankPool of 1) where the
model is installed, never in this one. Checked: tests/gpu/test_cuda_emulator.py's checks (dispatch/combine for
R = 1, 2, 4, 8 bitwise against the oracle of tests/conformance.py over several epochs, worst-case outputs, FP8
records and the FP8 cast, timeouts naming rank, phase and peer, the int32 epoch wrap), the emulator's launch
order and stream joins, and that the bench suite completes at a tiny shape with the documented records, JSON report and plot. Its
timings are the model's host time, meaningless as numbers. Skipped when ``moe_comm._C`` was not built, and
where a CUDA device is usable (tests/gpu runs the real thing there).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.cuda_model import skip_module_unless_modelled

skip_module_unless_modelled()

from moe_comm.launch import RankPool  # noqa: E402
from tests.conformance import Case  # noqa: E402
from tests.cuda_model import emulator_checks, install  # noqa: E402
from tests.cuda_model.simt import simt_built  # noqa: E402


class HostModel:
    """One rank process with the kernel model installed; :meth:`run` runs a body of emulator_checks there."""

    def __init__(self, ranks: RankPool, config: install.ModelConfig) -> None:
        self.ranks = ranks
        self.config = config

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.ranks.run(emulator_checks.on_host_model, self.config, fn, *args, **kwargs)[0]


# The kernel transcriptions, then the CUDA source itself on CPU fibers (tests/cuda_model/simt.py).
@pytest.fixture(scope="module", params=["python", "simt"], ids=["model", "simt"])
def model(request: pytest.FixtureRequest) -> Iterator[HostModel]:
    if request.param == "simt" and not simt_built():
        pytest.skip("moe_comm._C_simt is not built")
    memory_dir = tempfile.mkdtemp(prefix="moe_comm_model_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with RankPool(1, default_timeout_s=120.0) as ranks:
            yield HostModel(ranks, install.ModelConfig(memory_dir, kernels=request.param, order="shuffled"))
    finally:
        shutil.rmtree(memory_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# the emulator (tests/gpu/test_cuda_emulator.py on the model)

EXACT_CASES = [
    (1, Case(seed=31)),
    (2, Case(seed=32)),
    (2, Case(routing="masked", seed=33, dtype=torch.float32)),
    (4, Case(routing="zipf", seed=34)),
    (4, Case(routing="empty_rank", seed=35, dtype=torch.float16)),
    (8, Case(seed=36, tokens=12)),
    (8, Case(routing="same_rank", seed=37, tokens=12)),
]


@pytest.mark.parametrize(("world", "case"), EXACT_CASES, ids=[f"R{w}-{c.routing}-{str(c.dtype)[6:]}" for w, c in EXACT_CASES])
def test_emulator_dispatch_combine_exact(model, world, case):
    model.run(emulator_checks.check_exact, world, case)


def test_emulator_weighted_combine(model):
    model.run(emulator_checks.check_weighted_combine, 2, Case(seed=39))


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"R{w}")
def test_emulator_worst_case_outputs(model, world):
    model.run(emulator_checks.check_worst_case, world, Case(routing="masked", seed=40 + world))


def test_emulator_fp8_records_and_cast_bit_exact(model):
    model.run(emulator_checks.check_fp8, 4, Case(seed=45, tokens=17, hidden=512, num_topk=8, experts_per_rank=8))


def test_emulator_receive_alone_times_out(model):
    message = model.run(emulator_checks.check_receive_alone_times_out)
    assert "timed out after 0.05 s" in message, message


def test_emulator_epochs_wrap(model):
    message = model.run(emulator_checks.check_epochs_wrap, 4, Case(routing="zipf", seed=47))
    assert "timed out after 0.05 s" in message, message


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"R{w}")
def test_emulator_missing_sender_times_out_naming_it(model, world):
    messages = model.run(emulator_checks.check_missing_sender_times_out, world, Case(seed=50 + world, tokens=8))
    assert len(messages) == world


# ----------------------------------------------------------------------------------------------------
# the CUDA bench suite

COMM_FIELDS = ("op", "backend", "world_size", "tokens", "hidden", "topk", "num_experts", "dtype", "num_sms",
               "time_s_median", "baseline_time_s_median", "logical_bytes", "wire_bytes", "target", "target_met",
               "fraction_of_copy", "bandwidth_gbps", "baseline_bandwidth_gbps", "device", "emulated")


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"R{w}")
def test_bench_cuda_suite_on_model(model, world, tmp_path):
    tokens, hidden, topk, experts, overlap_sms = 64, 256, 4, 16, 4
    report_path = tmp_path / "bench_cuda.json"
    # SM sweep 1, 2 and 100: 100 SMs per rank times R ranks exceeds the model's 132 SMs, so the bench drops it.
    argv = ["--suite", "cuda", "--tokens", str(tokens), "--hidden", str(hidden), "--topk", str(topk),
            "--num-experts", str(experts), "--warmup", "1", "--iters", "2", "--cuda-world-size", str(world),
            "--cuda-num-sms", "2", "--cuda-sm-sweep", "1,2,100", "--cuda-overlap-sms", str(overlap_sms),
            "--json", str(report_path)]
    plot = tmp_path / "sweep.png"
    if world == 4:  # otherwise the plot goes next to the JSON report, as in scripts/gpu_check.sh
        argv += ["--cuda-plot", str(plot)]
    skipped = model.run(emulator_checks.run_bench, argv)
    assert skipped > 0, "the overlap test ran no large matmul"

    report = json.loads(report_path.read_text())
    assert report["machine"]["cuda_device"] == install.MODEL_DEVICE_NAME
    assert report["machine"]["cuda_sm_count"] == install.MODEL_SM_COUNT
    records = report["results"]
    assert [r["op"] for r in records] == ["dispatch_sweep", "dispatch", "combine_sweep", "combine",
                                          "overlap_matmul_with_dispatch_combine"]
    shape = {"backend": "cuda", "world_size": world, "tokens": tokens, "hidden": hidden, "topk": topk,
             "num_experts": experts, "device": install.MODEL_DEVICE_NAME}
    for r in records:
        assert {k: r[k] for k in shape} == shape, r
        assert r["time_s_median"] > 0 and r["baseline_time_s_median"] > 0, r
        assert isinstance(r["target"], str) and isinstance(r["target_met"], bool), r
    comm = records[:4]
    for r in comm:
        assert set(COMM_FIELDS) <= set(r), set(COMM_FIELDS) - set(r)
        assert r["num_sms"] == (1 if r["op"].endswith("_sweep") else 2)
        assert r["fraction_of_copy"] == pytest.approx(r["baseline_time_s_median"] / r["time_s_median"])
        assert r["target"] == "baseline time / op time >= 0.80" and r["target_met"] == (r["fraction_of_copy"] >= 0.80)
        assert r["logical_bytes"] > 0 and r["wire_bytes"] > 0
        assert r["dtype"] == ("float8_e4m3fn" if r["op"].startswith("dispatch") else "bfloat16")
    # The same received rows in both: dispatch moves a record per row (FP8 row + scales + top-k + source index),
    # combine a bf16 row.
    record = importlib.import_module("moe_comm._C").token_record_bytes(hidden, (hidden + 127) // 128, topk)
    dispatch, combine = comm[1], comm[3]
    assert dispatch["logical_bytes"] * 2 * hidden == combine["logical_bytes"] * record
    assert comm[0]["logical_bytes"] == dispatch["logical_bytes"] and comm[2]["logical_bytes"] == combine["logical_bytes"]
    overlap = records[4]
    per_rank = max(1, overlap_sms // world)
    assert overlap["num_sms"] == overlap["comm_sms_total"] == per_rank * world and overlap["comm_sms_per_rank"] == per_rank
    assert overlap["kept_fraction"] == pytest.approx(overlap["baseline_time_s_median"] / overlap["time_s_median"])
    target = 0.85 * (install.MODEL_SM_COUNT - per_rank * world) / install.MODEL_SM_COUNT
    assert overlap["target"] == f"kept throughput >= {target:.3f}" and overlap["target_met"] == (overlap["kept_fraction"] >= target)
    assert overlap["logical_bytes"] == 2 * 8192**3

    png = plot if world == 4 else report_path.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no plot at {png}"


def test_runner_process_is_untouched(model):
    """The model lives in the rank process only: this process still has the real extension and torch.cuda."""
    assert not install.installed()
    extension = sys.modules.get("moe_comm._C")
    assert extension is None or getattr(extension, "__file__", None), "moe_comm._C was replaced in the test runner"
    for patched in (torch.cuda.is_available, torch.cuda.get_device_properties, torch.cuda.Event, torch.Generator):
        assert not getattr(patched, "__module__", "").startswith("tests."), f"{patched} is patched in the test runner"
    assert torch.overrides._get_current_function_mode_stack() == []


def test_sanitizer_case_runs_on_model(model):
    assert model.run(emulator_checks.run_sanitizer_case).endswith(": ok")
