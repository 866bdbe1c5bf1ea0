"""shard_moe_experts: expert-parallel HF MoE models equal the unsharded model (logits and gradients) on 4 gloo ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.harness import pool_fixture

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pool = pool_fixture(4)

_COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=12, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                         num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=24, moe_intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=12, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2,
                                             n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
                                             kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
}


def _available() -> list[str]:
    return [name for name, (cls, _) in FAMILIES.items() if hasattr(transformers, cls)]


def _check_family(family: str):
    from moe_comm.integrations.transformers import ExpertParallelExperts, shard_moe_experts

    rank, world = dist.get_rank(), dist.get_world_size()
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**_COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # routers (zero-initialised in some families) and the DeepSeek correction bias get values
        for name, p in reference.named_parameters():
            p.normal_(0, 0.2 if "gate" in name else 0.1)
        for name, b in reference.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    model = shard_moe_experts(copy.deepcopy(reference), backend="torch")
    sharded = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    assert sharded and all(m.num_local_experts * world == m.num_experts for m in sharded)
    if family in ("qwen2_moe", "deepseek_v3"):  # shared experts run while the dispatch is in flight
        blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), ExpertParallelExperts)]
        assert blocks and all("forward" in vars(b) for b in blocks)

    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    logits = model(input_ids=ids).logits
    ref_logits = reference(input_ids=ids).logits
    assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-5), (logits - ref_logits).abs().max()
    weight = torch.randn(logits.shape, generator=gen)
    (logits * weight).sum().backward()
    (ref_logits * weight).sum().backward()

    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        ref = ref_params[name]
        if p.shape == ref.shape:
            assert p.grad is not None, name
            assert torch.allclose(p.grad, ref.grad, rtol=1e-4, atol=1e-5), (name, (p.grad - ref.grad).abs().max())
        else:
            # A local expert's gradient collects every rank's tokens: the reference's summed over ranks.
            total = ref.grad.clone()
            dist.all_reduce(total)
            owner = next(m for m in sharded if m.gate_up_proj is p or m.down_proj is p)
            sl = slice(owner.expert_offset, owner.expert_offset + owner.num_local_experts)
            assert torch.allclose(p.grad, total[sl], rtol=1e-4, atol=1e-5), (name, (p.grad - total[sl]).abs().max())
        checked += 1
    return checked


@pytest.mark.parametrize("family", _available() or ["none"])
def test_sharded_model_matches_full_model(pool, family):
    if family == "none":
        pytest.skip("this transformers version provides none of the supported MoE families")
    assert min(pool.run(_check_family, family)) > 0


def test_no_moe_raises():
    from moe_comm.integrations.transformers import shard_moe_experts

    with pytest.raises(ValueError, match="no fused MoE experts"):
        shard_moe_experts(torch.nn.Linear(2, 2))
