"""The environment doctor on this CPU-only machine: it reports, it does not crash, and it names fixes."""

from __future__ import annotations

import json

import torch

from moe_comm import doctor
from moe_comm.launch import find_free_port


def test_doctor_runs_and_self_test_is_exact(tmp_path):
    out = tmp_path / "doctor.json"
    status = doctor.main(["--json", str(out)])
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert status == 0
    assert checks["python"]["status"] == "ok" and checks["torch"]["status"] == "ok"
    assert checks["backend torch"]["status"] == "ok"
    assert checks["dispatch/combine self-test"]["status"] == "ok"
    assert "exact" in checks["dispatch/combine self-test"]["detail"]
    if not torch.cuda.is_available():
        assert checks["GPUs"]["status"] == "skip"


def test_every_non_ok_finding_names_a_fix():
    for check in doctor.run_checks(self_test=False):
        assert check.status in ("ok", "warn", "fail", "skip")
        if check.status in ("warn", "fail"):
            assert check.fix, f"{check.name}: no fix given"


def test_unreachable_master_address_fails_with_a_fix(monkeypatch):
    port = find_free_port()  # nothing listens there
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    checks = {c.name: c for c in doctor.run_checks(self_test=False)}
    reach = checks["MASTER_ADDR reachable"]
    assert reach.status == "fail" and f"127.0.0.1:{port}" in reach.detail and "MASTER_ADDR" in reach.fix


def test_cpu_kernels_check_reports_the_path_combine_takes():
    from moe_comm import cpu_kernels

    checks = {c.name: c for c in doctor.run_checks(self_test=False)}
    assert checks["CPU kernels moe_comm._cpu"].status == ("ok" if cpu_kernels.available()[0] else "warn")
    with cpu_kernels.forced_off():
        checks = {c.name: c for c in doctor.run_checks(self_test=False)}
    off = checks["CPU kernels moe_comm._cpu"]
    assert off.status == "warn" and "MOE_COMM_CPU_KERNELS=0" in off.detail and off.fix
