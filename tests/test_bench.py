"""``python -m moe_comm.bench`` spawns its ranks, measures next to the raw all-to-all and writes the documented JSON."""

from __future__ import annotations

import json
import shutil

from moe_comm.bench.__main__ import main
from tests.script_modules import load_script

REQUIRED = (
    "op",
    "backend",
    "world_size",
    "tokens",
    "hidden",
    "topk",
    "num_experts",
    "dtype",
    "time_s_median",
    "baseline_time_s_median",
    "logical_bytes",
    "wire_bytes",
)


def test_bench_writes_one_record_per_op(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--nprocs",
        "2",
        "--tokens",
        "96",
        "--hidden",
        "64",
        "--topk",
        "4",
        "--num-experts",
        "8",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["command"].startswith("python -m moe_comm.bench")
    records = {r["op"]: r for r in report["results"]}
    assert set(records) == {"dispatch", "cached_dispatch", "combine"}
    for r in records.values():
        assert all(key in r for key in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert r["world_size"] == 2 and r["tokens"] == 96 and r["hidden"] == 64
        assert r["time_s_median"] > 0 and r["baseline_time_s_median"] > 0
        # Wire bytes leave out the rows a rank keeps; with 2 ranks and 4 of 8 experts some always cross.
        assert 0 < r["wire_bytes"] < r["logical_bytes"]
        assert len(r["time_s_samples"]) == 3
        # CPU time covers the transport threads too: a transfer between processes costs its ranks some.
        assert r["cpu_time_s_median"] > 0 and r["baseline_cpu_time_s_median"] > 0
        assert r["host_cpu_load"] > 0 and r["ranks_on_host"] == 2
        # The second baseline: the same transfer into an output allocated once.
        assert r["baseline_prealloc_time_s_median"] > 0
        assert abs(r["ratio_to_prealloc_baseline"] - r["time_s_median"] / r["baseline_prealloc_time_s_median"]) < 1e-9
        assert r["check_inputs"] is True
    d = records["dispatch"]
    # Mean over ranks of the rows received, own rows included: between one and two ranks' tokens per rank.
    assert 96 * 2 * 64 <= d["logical_bytes"] <= 2 * 96 * 2 * 64
    assert d["floor_time_s_median"] > 0 and d["ratio_to_floor"] > 0
    printed = capsys.readouterr().out
    assert "dispatch floor" in printed and "combine CPU per rank" in printed
    assert "combine vs the a2a into a preallocated output" in printed

    # scripts/record_gpu_run.py turns a gpu_check.sh folder (here with these records as both portable runs)
    # into a results file and a gpu-log draft that names each portable op's ratio and target.
    recorder = load_script("record_gpu_run")
    run_dir, root = tmp_path / "gpu-out", tmp_path / "repo"
    run_dir.mkdir()
    (root / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(out, run_dir / "bench_portable.json")
    shutil.copy(out, run_dir / "bench_portable_cpu4.json")
    (run_dir / "summary.json").write_text(json.dumps({"steps_rc": {"build": 0, "bench_portable_cpu4": 0}, "total_s": 1}))
    recorder.ROOT = root
    assert recorder.main([str(run_dir), "Test Device 1", "--commit", "abc1234"]) == 0
    (written,) = (root / "benchmarks" / "results").iterdir()
    saved = json.loads(written.read_text())
    assert saved["bench_portable_cpu4"] == report and saved["steps_rc"]["bench_portable_cpu4"] == 0
    draft = capsys.readouterr().out
    assert draft.count("portable dispatch (gloo, 2 ranks on the host, hidden 64)") == 2
    assert "time <= 1.3 x baseline: " in draft


def test_bench_without_input_checks_says_so(tmp_path):
    out = tmp_path / "unchecked.json"
    argv = ["--nprocs", "2", "--tokens", "32", "--hidden", "32", "--topk", "2", "--num-experts", "4",
            "--warmup", "0", "--iters", "1", "--no-check-inputs", "--json", str(out)]
    assert main(argv) == 0
    records = json.loads(out.read_text())["results"]
    assert {r["op"] for r in records} == {"dispatch", "cached_dispatch", "combine"}
    assert all(r["check_inputs"] is False and r["shape"]["check_inputs"] is False for r in records)
