"""Launched by tests/test_launch.py under torchrun or mpiexec: init, one dispatch/combine, print a verdict."""

import sys

import torch
import torch.distributed as dist

from moe_comm import Buffer
from moe_comm.launch import init_distributed


def main() -> None:
    info = init_distributed()
    rank, world = info.rank, info.world_size
    use_comm = len(sys.argv) > 1 and sys.argv[1] == "comm"
    if use_comm:
        from mpi4py import MPI

        buf = Buffer(comm=MPI.COMM_WORLD, backend="torch")
    else:
        buf = Buffer(backend="torch")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 32, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(2 * world, generator=gen)[:2] for _ in range(6)])
    res = buf.dispatch(x, topk_idx=idx, num_experts=2 * world)
    out = buf.combine(res.recv_x, res.handle)
    reached = torch.stack([((idx // 2) == r).any(dim=1) for r in range(world)], dim=1).sum(dim=1)
    ok = torch.equal(out.combined_x, (x.float() * reached.unsqueeze(1)).bfloat16())
    print(f"RESULT rank={rank} world={world} launcher={info.launcher} backend={info.backend} ok={ok}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
