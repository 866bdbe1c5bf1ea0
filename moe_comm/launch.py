"""Starting ranks: ``init_distributed`` under torchrun, mpirun or alone; ``spawn`` and ``RankPool`` locally.

``init_distributed`` is what a training script calls first. It recognises three launchers:

- ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment): ``env://``;
- ``mpirun``/``mpiexec`` (Open MPI, MPICH/Hydra, Intel MPI, PMIx variables): rank and size come from
  ``mpi4py``'s ``COMM_WORLD`` and rank 0's address and a free port are broadcast over MPI;
- nothing: a world of one process.

It picks NCCL when every local rank has a GPU of its own and gloo otherwise, unless told.

``spawn`` starts N local ranks (gloo or NCCL) for examples and benchmarks and re-raises the first failing
rank's traceback in the caller. ``RankPool`` keeps N ranks alive and runs many functions in them, each
under a timeout: the test harness.
"""

from __future__ import annotations

import datetime
import importlib.util
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "RankFailure",
    "RankPool",
    "detect_launcher",
    "find_free_port",
    "init_distributed",
    "spawn",
]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands after :func:`init_distributed`.

    Attributes:
        rank: global rank in the default group.
        world_size: number of ranks in the default group.
        local_rank: rank among the processes of this node.
        backend: ``"nccl"`` or ``"gloo"``.
        launcher: ``"torchrun"``, ``"mpi"``, ``"spawn"`` or ``"single"``.
        device: the device this rank computes on (``cuda:<local_rank>`` under NCCL, else ``cpu``).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str
    device: torch.device


class RankFailure(RuntimeError):
    """A spawned rank raised or died; carries the rank and its formatted traceback."""

    def __init__(self, rank: int, remote_traceback: str, context: str = "") -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        where = f" in {context}" if context else ""
        super().__init__(f"rank {rank} failed{where}:\n{remote_traceback}")


def find_free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_launcher(environ: dict[str, str] | None = None) -> str:
    """Name the launcher that started this process: ``torchrun``, ``mpi`` or ``single``."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return "torchrun"
    if any(var in env for var in _MPI_SIZE_VARS + _MPI_RANK_VARS):
        return "mpi"
    return "single"


def _local_rank_from_env(env: dict[str, str] | os._Environ[str]) -> int | None:
    for var in ("LOCAL_RANK",) + _MPI_LOCAL_RANK_VARS:
        if var in env:
            return int(env[var])
    return None


def _choose_backend(requested: str | None, local_world_size: int) -> str:
    if requested is not None:
        if requested not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {requested!r}")
        return requested
    if torch.cuda.is_available() and torch.cuda.device_count() >= max(local_world_size, 1):
        return "nccl"
    return "gloo"


def _info_from_default_group(launcher: str, local_rank: int) -> DistInfo:
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, str(backend), launcher, device)


def init_distributed(
    backend: str | None = None,
    *,
    timeout_s: float = 600.0,
    launcher: str | None = None,
) -> DistInfo:
    """Initialise the default process group for whichever launcher started this process.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` to choose: NCCL when each local rank has its own GPU.
        timeout_s: the process group's collective timeout.
        launcher: force ``"torchrun"``, ``"mpi"`` or ``"single"`` instead of detecting it.

    Returns:
        A :class:`DistInfo`. Calling it again when the group exists returns the existing group's info.
    """
    env = os.environ
    launcher = launcher or detect_launcher()
    local_rank = _local_rank_from_env(env) or 0
    if dist.is_initialized():
        return _info_from_default_group(launcher, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)

    if launcher == "torchrun":
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        chosen = _choose_backend(backend, local_world)
        if chosen == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(chosen, init_method="env://", timeout=timeout)
    elif launcher == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise RuntimeError(
                "this process was started by mpirun but mpi4py is not installed: pip install 'moe-comm[mpi]'"
            ) from exc
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_world = node_comm.Get_rank(), node_comm.Get_size()
        node_comm.Free()
        address = None
        if rank == 0:
            host = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            address = (host, int(env.get("MASTER_PORT", 0)) or find_free_port())
        host, port = comm.bcast(address, root=0)
        chosen = _choose_backend(backend, local_world)
        if chosen == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            chosen, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size, timeout=timeout
        )
    elif launcher == "single":
        chosen = _choose_backend(backend, 1)
        if chosen == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(
            chosen, init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    else:
        raise ValueError(f"launcher must be 'torchrun', 'mpi' or 'single', got {launcher!r}")
    return _info_from_default_group(launcher, local_rank)


# --------------------------------------------------------------------------------------------------
# Local ranks: spawn and RankPool
# --------------------------------------------------------------------------------------------------


def _mp_context() -> mp.context.BaseContext:
    # forkserver forks ranks from a clean server that has torch preloaded: fast to start, and safe
    # because the server never ran OpenMP or CUDA code.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _resolve_function(module_file: str | None, module_name: str, qualname: str) -> Callable[..., Any]:
    """Find a function in a child by module name, or by file when the module is not importable."""
    if module_name == "__main__":
        # The parent's script: load it again under another name (its __main__ guard keeps it inert).
        if module_file is None:
            raise ValueError(f"cannot run {qualname!r} from an interactive __main__ in a spawned rank")
        module_name = "__moe_comm_main__"
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if module_file is None:
                raise
            spec = importlib.util.spec_from_file_location(module_name, module_file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _function_ref(fn: Callable[..., Any]) -> tuple[str | None, str, str]:
    module = sys.modules.get(fn.__module__)
    module_file = getattr(module, "__file__", None)
    return module_file, fn.__module__, fn.__qualname__


def _threads_per_rank(world_size: int) -> int:
    """Intra-op threads for one of ``world_size`` local ranks, decided by the launching process (ranks fork
    from a server whose environment predates the call): ``OMP_NUM_THREADS`` when set, else an equal
    share of the cores this process may run on (at least 1), so ranks do not oversubscribe the host and,
    where there are cores to spare, gathers and copies in each rank run in parallel."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size)


def _rank_setup(rank: int, world_size: int, port: int, backend: str, timeout_s: float, sys_path: list[str], threads: int) -> None:
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _spawn_entry(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    sys_path: list[str],
    threads: int,
    fn_ref: tuple[str | None, str, str],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    try:
        _rank_setup(rank, world_size, port, backend, timeout_s, sys_path, threads)
        fn = _resolve_function(*fn_ref)
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def _default_backend(backend: str | None, nprocs: int) -> str:
    return _choose_backend(backend, nprocs)


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` local ranks that share an initialised default process group.

    ``fn`` must be a module-level function (it is looked up by name in each rank). Each rank calls
    ``torch.distributed.get_rank()`` to know who it is.

    Args:
        fn: the function every rank runs.
        nprocs: number of ranks.
        *args: arguments passed to ``fn``, pickled.
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (NCCL when there is a GPU per rank, else gloo).
        timeout_s: bound on the whole run; ranks still running then are killed.

    Returns:
        The per-rank return values of ``fn``, indexed by rank.

    Raises:
        RankFailure: with the first failing rank's traceback, after stopping the other ranks.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    chosen = _default_backend(backend, nprocs)
    ctx = _mp_context()
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_spawn_entry,
            args=(rank, nprocs, port, chosen, timeout_s, list(sys.path), _threads_per_rank(nprocs), _function_ref(fn), args, results),
            daemon=False,
        )
        for rank in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < nprocs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(nprocs)) - set(values))
                raise TimeoutError(f"spawn: ranks {missing} did not finish {fn.__qualname__} within {timeout_s} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                if dead:
                    rank = dead[0]
                    raise RankFailure(rank, f"process exited with code {procs[rank].exitcode}", fn.__qualname__) from None
                continue
            if not ok:
                raise RankFailure(rank, value, fn.__qualname__)
            values[rank] = value
    finally:
        _stop_processes(procs, grace_s=5.0 if len(values) == nprocs else 1.0)
    return [values[rank] for rank in range(nprocs)]


def _stop_processes(procs: Sequence[mp.process.BaseProcess], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def _pool_worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    sys_path: list[str],
    threads: int,
    commands: Any,
    results: Any,
) -> None:
    try:
        _rank_setup(rank, world_size, port, backend, timeout_s, sys_path, threads)
    except BaseException:  # noqa: BLE001
        results.put((-1, rank, False, traceback.format_exc()))
        return
    results.put((-1, rank, True, None))
    while True:
        job = commands.get()
        if job is None:
            break
        job_id, fn_ref, args, kwargs = job
        try:
            value = _resolve_function(*fn_ref)(*args, **kwargs)
            results.put((job_id, rank, True, value))
        except BaseException:  # noqa: BLE001
            results.put((job_id, rank, False, traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


class RankPool:
    """N local ranks started once and reused to run many functions: the multi-rank test harness.

    Each call to :meth:`run` sends one function to every rank, waits up to ``timeout_s`` for all of
    them, and raises :class:`RankFailure` with the first failing rank's traceback. A timed-out or
    failed run leaves ranks in an unknown state (perhaps blocked in a collective), so the pool is
    restarted before the next run.

    Example::

        with RankPool(4) as pool:
            per_rank = pool.run(check_dispatch, seed=0)
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", default_timeout_s: float = 120.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.default_timeout_s = default_timeout_s
        self._ctx = _mp_context()
        self._procs: list[mp.process.BaseProcess] = []
        self._commands: list[Any] = []
        self._results: Any = None
        self._next_job = 0
        self._healthy = False

    def __enter__(self) -> RankPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the ranks and wait until each has joined the process group."""
        port = find_free_port()
        self._results = self._ctx.Queue()
        self._commands = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(
                target=_pool_worker,
                args=(rank, self.world_size, port, self.backend, 600.0, list(sys.path), _threads_per_rank(self.world_size),
                      self._commands[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect(-1, timeout_s=120.0, context="process group start-up")
        self._healthy = True

    def close(self) -> None:
        """Stop the ranks (gracefully when they are idle, by force otherwise)."""
        if self._healthy:
            for commands in self._commands:
                commands.put(None)
        _stop_processes(self._procs, grace_s=5.0 if self._healthy else 0.0)
        self._procs = []
        self._healthy = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results indexed by rank."""
        if not self._healthy:
            self.close()
            self.start()
        job_id = self._next_job
        self._next_job += 1
        fn_ref = _function_ref(fn)
        for commands in self._commands:
            commands.put((job_id, fn_ref, args, kwargs))
        try:
            return self._collect(job_id, timeout_s or self.default_timeout_s, fn.__qualname__)
        except BaseException:
            self._healthy = False
            raise

    def _collect(self, job_id: int, timeout_s: float, context: str) -> list[Any]:
        values: dict[int, Any] = {}
        failures: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout_s
        while len(values) + len(failures) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got_job, rank, ok, value = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values]
                if dead and not any(r == d for r, _ in failures for d in dead):
                    failures.append((dead[0], f"process died with exit code {self._procs[dead[0]].exitcode}"))
                continue
            if got_job != job_id:
                continue  # a late answer from a job that already failed
            if ok:
                values[rank] = value
            else:
                failures.append((rank, value))
                # The others may be blocked waiting for the failed rank; give them a moment to fail too.
                deadline = min(deadline, time.monotonic() + 10.0)
        if failures:
            rank, tb = failures[0]
            others = "".join(f"\n--- rank {r} also failed ---\n{t}" for r, t in failures[1:])
            raise RankFailure(rank, tb + others, context)
        if len(values) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(values))
            raise TimeoutError(f"ranks {missing} did not finish {context} within {timeout_s} s")
        return [values[rank] for rank in range(self.world_size)]
