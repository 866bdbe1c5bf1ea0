"""The intranode kernels on one GPU through the in-process multi-rank emulator (skipped without a GPU).

Each emulated rank runs the same kernels as a real rank; results are checked row by row against an
independent CPU computation (payloads encode their source rank and token index).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu import skip_module_without_cuda

pytestmark = pytest.mark.gpu

skip_module_without_cuda()

from moe_comm.backends import cuda_intranode as ops  # noqa: E402
from moe_comm.backends.cuda_emulator import MultiRankEmulator  # noqa: E402
from moe_comm.errors import CommTimeoutError  # noqa: E402
from moe_comm.fp8 import num_scale_blocks, per_token_cast_to_fp8  # noqa: E402
from tests.gpu.emulator_header import kernel_epochs, set_epochs  # noqa: E402


def _inputs(rank: int, tokens: int, hidden: int, topk: int, num_experts: int, seed: int):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randint(-8, 9, (tokens, hidden), generator=g).float()  # small integers: every sum is exact
    x[:, 0], x[:, 1] = rank, torch.arange(tokens)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(tokens)]) if tokens else torch.empty(0, topk, dtype=torch.long)
    if tokens:
        idx[torch.rand(tokens, topk, generator=g) < 0.2] = -1
    w = torch.rand(tokens, topk, generator=g)
    return x, idx, w


def _expected(xs, idxs, ws, rank, world, epr):
    rows, ids, wts, src, src_rank = [], [], [], [], []
    for s in range(world):
        owner = torch.where(idxs[s] >= 0, idxs[s] // epr, -1)
        hit = (owner == rank).any(dim=1) if idxs[s].numel() else torch.zeros(0, dtype=torch.bool)
        toks = torch.nonzero(hit).flatten()
        local = idxs[s][toks] - rank * epr
        keep = (idxs[s][toks] >= 0) & (local >= 0) & (local < epr)
        rows.append(xs[s][toks])
        ids.append(torch.where(keep, local, -1))
        wts.append(torch.where(keep, ws[s][toks], 0.0))
        src.append(toks)
        src_rank.append(torch.full_like(toks, s))
    return torch.cat(rows), torch.cat(ids), torch.cat(wts), torch.cat(src), torch.cat(src_rank)


class _Exchange:
    """Every rank's inputs for one routing, and a check of one dispatch + combine round through an emulator."""

    def __init__(self, world: int, dtype: torch.dtype, seed: int, hidden: int = 256, topk: int = 4, epr: int = 3) -> None:
        self.world, self.dtype, self.hidden, self.epr = world, dtype, hidden, epr
        self.num_experts = world * epr
        self.topk = min(topk, self.num_experts)
        self.tokens = [40 + 7 * r for r in range(world)]
        data = [_inputs(r, self.tokens[r], hidden, self.topk, self.num_experts, seed) for r in range(world)]
        self.xs, self.idxs, self.ws = ([d[i] for d in data] for i in range(3))

    def emulator(self) -> MultiRankEmulator:
        return MultiRankEmulator(self.world, *MultiRankEmulator.region_bytes_for(
            max(self.tokens), self.hidden, self.dtype, 0, self.topk, self.dtype))

    def check_round(self, emu: MultiRankEmulator, plans: list, num_sms: int, what: str) -> None:
        """Dispatch, then combine with rank d's rows scaled by (d + 1); every row and token checked exactly."""
        dev, world = emu.device, self.world
        outs = emu.dispatch(plans, [x.to(dev, self.dtype) for x in self.xs], topk_idx=[i.to(dev) for i in self.idxs],
                            topk_weights=[w.to(dev) for w in self.ws], num_experts=self.num_experts, num_sms=num_sms)
        torch.cuda.synchronize()
        emu.raise_if_failed("dispatch")
        for d in range(world):
            rows, ids, wts, src, src_rank = _expected(self.xs, self.idxs, self.ws, d, world, self.epr)
            o = outs[d]
            assert torch.equal(o.recv_x.cpu().float(), rows), f"{what}: rank {d}: rows differ"
            assert torch.equal(o.recv_topk_idx.cpu(), ids), f"{what}: rank {d}: recv_topk_idx"
            assert torch.equal(o.recv_topk_weights.cpu(), wts), f"{what}: rank {d}: recv_topk_weights"
            assert torch.equal(o.recv_src_idx.cpu().long(), src), f"{what}: rank {d}: recv_src_idx"
            assert torch.equal(o.recv_src_rank.cpu().long(), src_rank), f"{what}: rank {d}: recv_src_rank"
        # Token t gets x * the sum of (d + 1) over the ranks d it reached.
        back = emu.combine(plans, [o.recv_x * (d + 1) for d, o in enumerate(outs)], num_sms=max(1, num_sms - 1))
        torch.cuda.synchronize()
        emu.raise_if_failed("combine")
        for s in range(world):
            owner = torch.where(self.idxs[s] >= 0, self.idxs[s] // self.epr, -1)
            acc = torch.zeros(self.tokens[s], self.hidden)  # float32, rank by rank, like the kernel
            for d in range(world):
                reached = (owner == d).any(dim=1).unsqueeze(1)
                acc += torch.where(reached, (self.xs[s].to(self.dtype) * (d + 1)).float(), 0.0)
            assert torch.equal(back[s].cpu(), acc.to(self.dtype)), f"{what}: rank {s}: combine differs"


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dispatch_combine_exact(world, dtype):
    ex = _Exchange(world, dtype, seed=world)
    emu = ex.emulator()
    plans = emu.plan([i.to(emu.device) for i in ex.idxs], ex.num_experts, num_sms=4)
    for repeat in range(3):  # several epochs through the same regions
        ex.check_round(emu, plans, num_sms=4 + repeat, what=f"call {repeat}")
    emu.destroy()


def test_epochs_wrap():
    """The int32 epochs wrap after 2^31 calls (they are serial numbers). From two calls before the wrap, three
    rounds stay exact and leave every kernel's epoch at -2^31; at the wrap, a receive whose senders never ran
    waits for them (a flag of 2^31 - 1 has not reached -2^31) and times out."""
    int_max = 2**31 - 1
    ex = _Exchange(4, torch.bfloat16, seed=31)
    emu = ex.emulator()
    plans = emu.plan([i.to(emu.device) for i in ex.idxs], ex.num_experts, num_sms=3)
    set_epochs(emu, int_max - 2)
    for call in range(3):  # epochs 2^31 - 2, 2^31 - 1, -2^31
        ex.check_round(emu, plans, num_sms=3, what=f"call {call} from epoch 2^31 - 3")
    for rank, buf in enumerate(emu.buffers):
        assert set(kernel_epochs(buf)) == {-(2**31)}, f"rank {rank}: epochs after the wrap {kernel_epochs(buf)}"
    emu.destroy()
    message = _receive_alone_times_out(epoch=int_max)
    assert f"(expected >= {-(2**31)}, observed {int_max})" in message, message


def test_fp8_records_bit_exact():
    world, hidden, topk, epr = 4, 512, 8, 8
    num_experts = world * epr
    data = [_inputs(r, 33, hidden, topk, num_experts, seed=5) for r in range(world)]
    fp8 = [per_token_cast_to_fp8(d[0].bfloat16()) for d in data]
    emu = MultiRankEmulator(world, *MultiRankEmulator.region_bytes_for(33, hidden, torch.float8_e4m3fn, hidden // 128, topk, torch.bfloat16))
    dev = emu.device
    plans = emu.plan([d[1].to(dev) for d in data], num_experts, num_sms=2)
    outs = emu.dispatch(plans, [f[0].to(dev) for f in fp8], x_scales=[f[1].to(dev) for f in fp8],
                        topk_idx=[d[1].to(dev) for d in data], num_experts=num_experts, num_sms=2)
    torch.cuda.synchronize()
    emu.raise_if_failed("dispatch")
    for d in range(world):
        exp_rows = torch.cat([fp8[s][0][plans[s].is_token_in_rank[:, d].cpu()] for s in range(world)])
        exp_scales = torch.cat([fp8[s][1][plans[s].is_token_in_rank[:, d].cpu()] for s in range(world)])
        assert torch.equal(outs[d].recv_x.cpu().view(torch.uint8), exp_rows.view(torch.uint8))
        assert torch.equal(outs[d].recv_scales.cpu(), exp_scales)
    emu.destroy()


@pytest.mark.parametrize("hidden", [7168, 208], ids=["H7168", "H208-partial-block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_fp8_cast_dispatch_bit_exact(hidden, dtype):
    """The send kernels' fused cast delivers what casting first (moe_comm.fp8) and dispatching delivers."""
    world, topk, epr = 4, 8, 8
    num_experts = world * epr
    data = [_inputs(r, 37, hidden, topk, num_experts, seed=6) for r in range(world)]
    xs = [(d[0].float() * torch.logspace(-3, 3, 37).unsqueeze(1)).to(dtype) for d in data]
    xs[1][5] = 0  # an all-zero row takes the 1e-4 floor
    emu = MultiRankEmulator(world, *MultiRankEmulator.region_bytes_for(37, hidden, torch.float8_e4m3fn, num_scale_blocks(hidden), topk, torch.bfloat16))
    dev = emu.device
    plans = emu.plan([d[1].to(dev) for d in data], num_experts, num_sms=2)
    outs = emu.dispatch(plans, [x.to(dev) for x in xs], topk_idx=[d[1].to(dev) for d in data], num_experts=num_experts,
                        num_sms=3, cast_fp8=True)
    torch.cuda.synchronize()
    emu.raise_if_failed("fused-cast dispatch")
    fp8 = [per_token_cast_to_fp8(x) for x in xs]
    for d in range(world):
        exp_rows = torch.cat([fp8[s][0][plans[s].is_token_in_rank[:, d].cpu()] for s in range(world)])
        exp_scales = torch.cat([fp8[s][1][plans[s].is_token_in_rank[:, d].cpu()] for s in range(world)])
        assert torch.equal(outs[d].recv_x.cpu().view(torch.uint8), exp_rows.view(torch.uint8)), f"rank {d}: FP8 rows differ"
        assert torch.equal(outs[d].recv_scales.cpu(), exp_scales), f"rank {d}: scales differ"
    emu.destroy()


@pytest.mark.parametrize("hidden", [7168, 200, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_cast_kernel_bit_exact(hidden, dtype):
    x = (torch.randn(65, hidden) * torch.logspace(-3, 3, 65).unsqueeze(1)).to(dtype)
    x[3] = 0  # all-zero rows take the 1e-4 floor
    data, scales = ops.per_token_cast_fp8(x.cuda(), num_sms=8)
    ref_data, ref_scales = per_token_cast_to_fp8(x)
    assert torch.equal(data.cpu().view(torch.uint8), ref_data.view(torch.uint8))
    assert torch.equal(scales.cpu(), ref_scales)


def _receive_alone_times_out(epoch: int | None = None) -> str:
    """Rank 0's receive alone, no send anywhere (every kernel first at `epoch`, if given): the timeout's message."""
    emu = MultiRankEmulator(2, 1 << 20, 1 << 20, timeout_s=0.05)
    dev = emu.device
    idx = torch.zeros(4, 1, dtype=torch.int64, device=dev)
    plans = emu.plan([idx, idx], 2, num_sms=1)
    if epoch is not None:
        set_epochs(emu, epoch)
    out = ops.allocate_dispatch_outputs(plans[0], torch.empty(4, 64, device=dev), 0, 0, False, True, False)
    buf = emu.buffers[0]
    ops.dispatch_recv(buf, plans[0], out, 1, torch.cuda.current_stream())
    torch.cuda.synchronize()
    with pytest.raises(CommTimeoutError, match=r"rank 0: .*dispatch arrive flag of peer rank [01]") as caught:
        buf.raise_if_failed("dispatch")
    emu.destroy()
    return str(caught.value)


def test_missing_sender_times_out_naming_phase_and_peer():
    _receive_alone_times_out()
