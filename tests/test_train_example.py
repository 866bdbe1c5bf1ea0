"""examples/train_moe.py: the loss falls, and EP, PP and PP x EP training equal a single-process run of the same global batch."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.distributed as dist

from tests.harness import pool_fixture

_PATH = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_moe.py"
_spec = importlib.util.spec_from_file_location("train_moe", _PATH)
train_moe = importlib.util.module_from_spec(_spec)
sys.modules["train_moe"] = train_moe
_spec.loader.exec_module(train_moe)

pool = pool_fixture(2)


def _small(**kw):
    model = train_moe.ModelConfig(layers=2, experts=8, topk=2, seq=16)
    return train_moe.TrainConfig(batch=8, model=model, progress=False, backend="torch", **kw)


def _ep_vs_single(steps: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    tc = _small(steps=steps, ep=world)
    ep_history = train_moe.train(tc, dist.group.WORLD, None, quiet=True)
    ref_tc = dataclasses.replace(tc, ep=1, batch=tc.batch * world)
    ref_history = train_moe.train(ref_tc, singles[rank], None, quiet=True)
    return ep_history["loss"], ref_history["loss"]


def test_ep_training_matches_single_process(pool):
    for ep_loss, ref_loss in pool.run(_ep_vs_single, 4):
        for a, b in zip(ep_loss, ref_loss, strict=True):
            assert abs(a - b) <= 2e-5 * max(1.0, abs(b)), (ep_loss, ref_loss)


def _short_run(steps: int):
    tc = _small(steps=steps, ep=dist.get_world_size(), lr=1e-2)
    return train_moe.train(tc, dist.group.WORLD, None, quiet=True)


def test_loss_falls(pool):
    history = pool.run(_short_run, 80)[0]
    first, last = sum(history["loss"][:3]) / 3, sum(history["loss"][-3:]) / 3
    assert last < first - 0.25, history["loss"]
    assert all(0 <= c <= s for c, s in zip(history["comm_s"], history["step_s"], strict=True))


def test_cli_json(tmp_path):
    import json
    import subprocess

    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, str(_PATH), "--steps", "3", "--nprocs", "2", "--batch", "4", "--json", str(out), "--png", "", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["loss"]) == 3 and len(data["step_s"]) == 3 and data["config"]["ep"] == 2


def _pp_vs_single(steps: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    tc = _small(steps=steps, ep=1, pp=world, chunks=2 * world)
    tc = dataclasses.replace(tc, model=dataclasses.replace(tc.model, layers=2 * world))
    pp_history = train_moe.train(tc, singles[rank], dist.group.WORLD, quiet=True)
    ref_history = train_moe.train(dataclasses.replace(tc, pp=1), singles[rank], None, quiet=True)
    return pp_history["loss"], ref_history["loss"]


def test_pipeline_training_matches_single_process(pool):
    if train_moe._dualpipev() is None:
        pytest.skip("dualpipe.DualPipeV (the pipeline runtime) is not available in this checkout")
    pp_loss, ref_loss = pool.run(_pp_vs_single, 3)[0]
    assert len(pp_loss) == len(ref_loss) == 3
    for a, b in zip(pp_loss, ref_loss, strict=True):
        assert abs(a - b) <= 2e-5 * max(1.0, abs(b)), (pp_loss, ref_loss)


def _overlapped_equals_sequential():
    rank, world = dist.get_rank(), dist.get_world_size()
    tc = _small(steps=0, ep=world)
    cfg = tc.model
    results = []
    for overlapped in (False, True):
        buffer = train_moe.Buffer(dist.group.WORLD, backend="torch", num_experts=cfg.experts)
        model = train_moe.build_model(cfg, 0, buffer, rank, world)
        x0, y0 = train_moe.make_batch(cfg, 4, 10 + rank, 0)
        x1, y1 = train_moe.make_batch(cfg, 4, 20 + rank, 0)
        loss1 = train_moe.criterion(model(x1), y1)
        if overlapped:
            (out0,), loss0 = train_moe.Stage.overlapped_forward_backward(model, (x0,), train_moe.criterion, (y0,), model, loss1, None, None)
        else:
            loss1.backward()
            out0 = model(x0)
            loss0 = train_moe.criterion(out0, y0)
        loss0.backward()
        results.append((out0.detach(), [p.grad.clone() for p in model.parameters()]))
        buffer.destroy()
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(ga, gb, strict=True))
    return True


def test_overlapped_forward_backward_equals_sequential(pool):
    assert all(pool.run(_overlapped_equals_sequential))


pool4 = pool_fixture(4)


def _pp_ep_vs_single(steps: int):
    """PP 2 x EP 2 on 4 ranks (the example's own grid) against one process training the same global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tc = _small(steps=steps, ep=2, pp=2, chunks=4)
    tc = dataclasses.replace(tc, model=dataclasses.replace(tc.model, layers=4))  # 2 PP ranks x 2 DualPipeV stages: a layer each
    ep_group, pp_group = train_moe._grid(tc)
    singles = [dist.new_group([r]) for r in range(world)]
    grid_history = train_moe.train(tc, ep_group, pp_group, quiet=True)
    ref_tc = dataclasses.replace(tc, ep=1, pp=1, batch=tc.batch * tc.ep)
    ref_history = train_moe.train(ref_tc, singles[rank], None, quiet=True) if rank == 0 else None
    return grid_history["loss"], ref_history["loss"] if ref_history is not None else None


def test_pipeline_x_expert_parallel_training_matches_single_process(pool4):
    if train_moe._dualpipev() is None:
        pytest.skip("dualpipe.DualPipeV (the pipeline runtime) is not available in this checkout")
    results = pool4.run(_pp_ep_vs_single, 3)
    grid_loss, ref_loss = results[0]  # world rank 0 = pipeline rank 0 of EP group 0: it reports the EP-mean loss
    assert results[1][0] == grid_loss  # its EP peer reports the same (all-reduced) loss
    assert results[2][0] == results[3][0] == []  # pipeline rank 1 sees no loss
    assert len(grid_loss) == len(ref_loss) == 3
    for a, b in zip(grid_loss, ref_loss, strict=True):
        assert abs(a - b) <= 2e-5 * max(1.0, abs(b)), (grid_loss, ref_loss)
