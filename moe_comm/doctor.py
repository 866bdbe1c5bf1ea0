"""``python -m moe_comm.doctor``: check this environment and say how to fix what is wrong.

Each check reports ``ok``, ``warn``, ``fail`` or ``skip`` with a detail and, when not ok, a concrete fix.
On a machine without GPUs the GPU checks are skipped, not failed. The run ends with a tiny end-to-end
dispatch/combine self-test across local ranks (2 CPU ranks over gloo, or one rank per GPU with NCCL).
Exit status: 0 unless a check marked ``fail`` matters for using the library here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["Check", "run_checks", "main"]


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, its status (ok/warn/fail/skip), what was seen, and the fix."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _versions() -> list[Check]:
    checks = [Check("python", "ok" if sys.version_info >= (3, 10) else "fail", platform.python_version(), "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer")]
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    ok = (major, minor) >= (2, 4)
    checks.append(Check("torch", "ok" if ok else "fail", torch.__version__, "" if ok else "pip install 'torch>=2.4'"))
    cuda = torch.version.cuda
    checks.append(Check("torch CUDA build", "ok" if cuda else "warn", f"CUDA {cuda}" if cuda else "CPU-only build of torch",
                        "" if cuda else "for GPUs install a CUDA build of torch (pip install torch from PyPI on Linux)"))
    nccl = None
    if dist.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a CPU build has no NCCL
            nccl = None
    checks.append(Check("NCCL", "ok" if nccl else "skip", nccl or "not available (CPU-only torch)", "" if nccl else "comes with a CUDA build of torch"))
    checks.append(Check("torch.distributed", "ok" if dist.is_available() else "fail", "available" if dist.is_available() else "missing",
                        "" if dist.is_available() else "install a torch build with distributed support"))
    return checks


def _extension() -> list[Check]:
    try:
        ext = importlib.import_module("moe_comm._C")
    except ImportError as exc:
        return [Check("CUDA extension moe_comm._C", "warn", f"not built ({exc})",
                      "install with nvcc on PATH: pip install -e . (MOE_COMM_CUDA_ARCHS=90 picks sm_90); the portable backend works without it")]
    archs = "unknown"
    for attr in ("compiled_architectures", "compiled_archs", "architectures"):
        fn = getattr(ext, attr, None)
        if callable(fn):
            archs = str(fn())
            break
    return [Check("CUDA extension moe_comm._C", "ok", f"built for {archs}")]


def _cpu_kernels() -> list[Check]:
    from moe_comm import cpu_kernels

    usable, reason = cpu_kernels.available()
    if usable:
        return [Check("CPU kernels moe_comm._cpu", "ok", "combine's sum and dispatch's top-k unpacking run compiled")]
    return [Check("CPU kernels moe_comm._cpu", "warn", reason,
                  "reinstall with a C++ compiler (pip install -e .); without it CPU ranks use slower PyTorch code, same results")]


def _host_memory() -> list[Check]:
    from moe_comm import host_memory

    usable, reason = host_memory.huge_pages_available()
    if usable:
        return [Check("huge-page host outputs", "ok", reason)]
    return [Check("huge-page host outputs", "skip", reason,
                  "large CPU outputs then fault once per 4 KiB page (slower above 32 MiB), same results")]


def _gpus() -> list[Check]:
    if not torch.cuda.is_available():
        return [Check("GPUs", "skip", "no CUDA device visible", "none needed for the portable backend on CPU"),
                Check("CUDA IPC", "skip", "no CUDA device visible")]
    count = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    checks = [Check("GPUs", "ok", f"{count}: {names}")]
    if count > 1:
        missing = [(a, b) for a in range(count) for b in range(count) if a != b and not torch.cuda.can_device_access_peer(a, b)]
        checks.append(Check("peer-to-peer access", "ok" if not missing else "warn",
                            "every pair" if not missing else f"no P2P between {missing[:6]}",
                            "" if not missing else "check NVLink/PCIe topology (nvidia-smi topo -m) and IOMMU/ACS settings"))
    else:
        checks.append(Check("peer-to-peer access", "skip", "one GPU: the CUDA backend runs several ranks on it (single-GPU mode)"))
    try:
        # What torch.multiprocessing does to share a CUDA tensor: export a CUDA IPC handle of its memory.
        torch.empty(1024, device="cuda").untyped_storage()._share_cuda_()
        checks.append(Check("CUDA IPC", "ok", "IPC memory handles can be exported (needed by the cuda backend)"))
    except Exception as exc:  # noqa: BLE001 - the report says why
        checks.append(Check("CUDA IPC", "fail", f"cannot export an IPC handle: {type(exc).__name__}: {exc}",
                            "CUDA IPC is unavailable under MIG, some containers (add --ipc=host) and WSL; use backend='torch'"))
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        links = 0
        for link in range(18):
            try:
                links += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == 1)
            except pynvml.NVMLError:
                break
        checks.append(Check("NVLink", "ok" if links else "warn", f"GPU 0 has {links} active NVLink links",
                            "" if links else "without NVLink intranode traffic crosses PCIe"))
    except Exception as exc:  # noqa: BLE001 - NVML is optional
        checks.append(Check("NVLink", "skip", f"NVML not available ({type(exc).__name__})", "pip install nvidia-ml-py to read the topology"))
    return checks


def _launcher() -> list[Check]:
    from moe_comm.launch import detect_launcher

    launcher = detect_launcher()
    checks = [Check("launcher", "ok", launcher)]
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if launcher == "torchrun" and addr and port:
        try:
            with socket.create_connection((addr, int(port)), timeout=2.0):
                pass
            checks.append(Check("MASTER_ADDR reachable", "ok", f"{addr}:{port}"))
        except OSError as exc:
            checks.append(Check("MASTER_ADDR reachable", "fail", f"{addr}:{port}: {exc}",
                                "start rank 0 first, or fix MASTER_ADDR/MASTER_PORT and the firewall between nodes"))
    try:
        importlib.import_module("mpi4py")
        checks.append(Check("mpi4py", "ok", "importable: mpirun/mpiexec launch works"))
    except ImportError:
        checks.append(Check("mpi4py", "skip", "not installed", "pip install 'moe-comm[mpi]' to launch with mpirun"))
    return checks


def _backends() -> list[Check]:
    from moe_comm import available_backends

    return [Check(f"backend {name}", "ok" if usable else "skip", reason, "" if usable else "see the CUDA extension check")
            for name, (usable, reason) in available_backends().items()]


def _self_test_rank() -> bool:
    from moe_comm import Buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = Buffer(timeout_s=30)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(16, 64, generator=gen).bfloat16().to(device)
    idx = torch.stack([torch.randperm(4 * world, generator=gen)[:2] for _ in range(16)]).to(device)
    res = buf.dispatch(x, topk_idx=idx, num_experts=4 * world)
    out = buf.combine(res.recv_x, res.handle)
    reached = torch.stack([((idx // 4) == r).any(dim=1) for r in range(world)], dim=1).sum(dim=1)
    return bool(torch.equal(out.combined_x, (x.float() * reached.unsqueeze(1)).bfloat16()))


def _self_test_entry() -> bool:
    return _self_test_rank()


def _self_test() -> list[Check]:
    from moe_comm.launch import spawn

    nprocs = torch.cuda.device_count() if torch.cuda.device_count() > 1 else 2
    backend = "nccl" if torch.cuda.device_count() > 1 else "gloo"
    try:
        results = spawn(_self_test_entry, nprocs, backend=backend, timeout_s=90)
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return [Check("dispatch/combine self-test", "fail", f"{nprocs} ranks over {backend}: {first}",
                      "run python -m moe_comm.doctor --json out.json and include it in a bug report")]
    ok = all(results)
    return [Check("dispatch/combine self-test", "ok" if ok else "fail", f"{nprocs} ranks over {backend}: {'exact' if ok else 'WRONG RESULT'}",
                  "" if ok else "report a bug with this output")]


SECTIONS: list[tuple[str, Callable[[], list[Check]]]] = [
    ("versions", _versions),
    ("extension", _extension),
    ("cpu kernels", _cpu_kernels),
    ("host memory", _host_memory),
    ("gpus", _gpus),
    ("launcher", _launcher),
    ("backends", _backends),
]


def run_checks(self_test: bool = True) -> list[Check]:
    """Run every check (and the self-test unless disabled); a check that crashes is reported as failed."""
    checks: list[Check] = []
    sections = SECTIONS + ([("self-test", _self_test)] if self_test else [])
    for name, fn in sections:
        try:
            checks.extend(fn())
        except Exception as exc:  # noqa: BLE001 - the doctor never crashes on what it examines
            checks.append(Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}", "report a bug"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_comm.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the findings here")
    parser.add_argument("--no-self-test", action="store_true", help="skip the multi-rank self-test")
    args = parser.parse_args(argv)
    checks = run_checks(self_test=not args.no_self_test)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status.upper():<5} {c.name:<{width}}  {c.detail}" + (f"\n      fix: {c.fix}" if c.status in ("fail", "warn") and c.fix else ""))
    failed = [c for c in checks if c.status == "fail"]
    print(f"\n{len(checks)} checks: {sum(c.status == 'ok' for c in checks)} ok, {sum(c.status == 'warn' for c in checks)} warn, "
          f"{len(failed)} fail, {sum(c.status == 'skip' for c in checks)} skip")
    if args.json is not None:
        args.json.write_text(json.dumps({"checks": [asdict(c) for c in checks]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
