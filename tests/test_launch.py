"""Launching: torchrun, mpiexec (mpi4py), a single process, and spawn's failure propagation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_comm import available_backends
from moe_comm.launch import RankFailure, _threads_per_rank, detect_launcher, spawn

SCRIPT = Path(__file__).parent / "launch_scripts" / "roundtrip.py"
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_RESULT = re.compile(r"RESULT rank=(\d+) world=(\d+) launcher=(\w+) backend=(\w+) ok=(True|False)")


def _results(stdout: str) -> list[dict[str, str]]:
    # Ranks share one pipe, so a line of one rank may land in the middle of another's output.
    keys = ("rank", "world", "launcher", "backend", "ok")
    return [dict(zip(keys, m.groups(), strict=True)) for m in _RESULT.finditer(stdout)]


def test_torchrun_launch():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run(
        cmd + ["--standalone", "--nproc_per_node", "2", str(SCRIPT)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(proc.stdout)
    assert sorted(r["rank"] for r in results) == ["0", "1"]
    assert all(r["launcher"] == "torchrun" and r["backend"] == "gloo" and r["ok"] == "True" for r in results)


def _mpiexec() -> str | None:
    local = Path(sys.executable).with_name("mpiexec")
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


@pytest.mark.parametrize("mode", ["group", "comm"])
def test_mpiexec_launch(mode):
    pytest.importorskip("mpi4py", reason="mpi4py is the [mpi] extra")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(SCRIPT)] + (["comm"] if mode == "comm" else []),
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = _results(proc.stdout)
    assert sorted(r["rank"] for r in results) == ["0", "1"]
    assert all(r["launcher"] == "mpi" and r["ok"] == "True" for r in results)


def test_single_process_world_of_one():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = _results(proc.stdout)
    assert result == {"rank": "0", "world": "1", "launcher": "single", "backend": "gloo", "ok": "True"}


def test_detect_launcher():
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) == "torchrun"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert detect_launcher({}) == "single"


def _fails_on_rank_one(message: str) -> int:
    if dist.get_rank() == 1:
        raise RuntimeError(message)
    return dist.get_rank()


def _returns_rank() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def test_spawn_returns_per_rank_values():
    assert spawn(_returns_rank, 3, backend="gloo") == [(0, 3), (1, 3), (2, 3)]


def _intra_op_threads() -> int:
    return torch.get_num_threads()


def test_spawned_ranks_take_an_equal_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert [_threads_per_rank(w) for w in (1, 2, 4, 64)] == [cores, max(1, cores // 2), max(1, cores // 4), max(1, cores // 64)]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins, and reaches the ranks
    assert _threads_per_rank(2) == 3
    assert spawn(_intra_op_threads, 2, backend="gloo") == [3, 3]


def test_spawn_propagates_the_failing_rank_traceback():
    with pytest.raises(RankFailure) as info:
        spawn(_fails_on_rank_one, 2, "boom from rank one", backend="gloo", timeout_s=60)
    assert info.value.rank == 1
    assert "boom from rank one" in str(info.value) and "Traceback" in str(info.value)


def test_available_backends_reports_torch_always():
    report = available_backends()
    assert report["torch"][0] is True
    usable, reason = report["cuda"]
    assert isinstance(usable, bool) and reason
