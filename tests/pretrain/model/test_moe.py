"""The Mixture-of-Experts layer against transformers' Mixtral and the papers' formulas.

* Loss and gradients (fp32, a packed batch, 2 MoE layers of 4 experts, top-2): our summed cross-entropy equals
  `MixtralForCausalLM`'s with the same weights (its eager and SDPA attention) to 1e-5 relative; the load-balancing
  loss equals transformers' `load_balancing_loss_func` applied layer by layer, divided by top_k (it counts
  assignments per token, we per assignment), averaged over layers, to 1e-6; the z-loss equals ST-MoE's formula
  on transformers' router logits; the gradient of cross-entropy + both weighted losses equals transformers' for
  every parameter to 1e-4 in norm (observed about 2e-6).
* The routing weights equal Mixtral's router (softmax over all experts, top-k, renormalised) to 1e-6.
* The grouped GEMM equals the loop over experts, forward and backward, with an expert that gets no token.
* The losses at the formulas' fixed points: balance 1 with uniform routing, E when one expert takes everything
  (top-1), z-loss (ln E)^2 for zero logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig, compose_pretrain_config
from pretrain.evaluation.export import ExportError, hf_name, hf_state_dict, mixtral_config, write_hf_model
from pretrain.model.config import MoEConfig
from pretrain.model.flops import count_active_parameters, count_parameters, flops_per_token
from pretrain.model.moe import STAT_BALANCE, STAT_COUNTS, STAT_Z, Experts, MoEFeedForward
from pretrain.model.transformer import Transformer
from tests.pretrain.model.test_sliding_window import model_with_weights, packed_batch

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

BALANCE, Z = 0.1, 0.01
CFG = ModelConfig(
    name="moe", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
    init_std=0.2, loss_chunk_size=0,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=48, load_balance_coef=BALANCE, z_loss_coef=Z),
)  # fmt: skip


def hf_mixtral(state: dict[str, torch.Tensor], attention: str, cfg: ModelConfig = CFG):
    config = mixtral_config(cfg, bos_id=1, eos_id=2, pad_id=0, dtype="float32")
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**config, attn_implementation=attention)
    )
    model.load_state_dict(hf_state_dict(state, cfg), strict=True)
    return model


def test_loss_router_losses_and_gradients_equal_transformers_mixtral():
    ours = model_with_weights(CFG)
    batch = packed_batch()
    loss = ours(
        batch["input_ids"], batch["position_ids"], batch["document_ids"], batch["labels"], None, "sum"
    )
    stats = ours.router_stats
    (loss + ours.router_loss).backward()
    grads = {hf_name(name): param.grad for name, param in ours.named_parameters()}
    for attention in ("eager", "sdpa"):
        model = hf_mixtral(ours.state_dict(), attention)
        out = model(
            batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, output_router_logits=True
        )
        theirs = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        per_layer = [load_balancing_loss_func((g,), 4, 2) / 2 for g in out.router_logits]
        z_losses = [torch.logsumexp(g.float(), dim=-1).pow(2).mean() for g in out.router_logits]
        assert abs(loss.item() - theirs.item()) / theirs.item() < 1e-5, attention
        for layer, (balance, z_loss) in enumerate(zip(per_layer, z_losses, strict=True)):
            assert abs(stats[layer, STAT_BALANCE].item() - balance.item()) < 1e-6
            assert abs(stats[layer, STAT_Z].item() - z_loss.item()) < 1e-5 * z_loss.item()
        objective = (
            theirs
            + torch.stack([BALANCE * b + Z * z for b, z in zip(per_layer, z_losses, strict=True)]).mean()
        )
        objective.backward()
        for name, param in model.named_parameters():
            assert float((grads[name] - param.grad).norm() / param.grad.norm()) < 1e-4, (attention, name)


def test_routing_weights_are_mixtrals_renormalised_top_k():
    layer = model_with_weights(CFG).layers[0].mlp
    config = transformers.MixtralConfig(**mixtral_config(CFG, 1, 2, 0, "float32"))
    router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(config)
    router.weight.data.copy_(layer.router.weight.data)
    tokens = torch.randn(50, CFG.dim, generator=torch.Generator().manual_seed(2))
    _, experts, weights = layer.route(tokens)
    _, their_weights, their_experts = router(tokens)
    assert torch.equal(experts, their_experts)
    assert (weights - their_weights).abs().max().item() < 1e-6


def test_grouped_gemm_equals_the_loop_over_experts_forward_and_backward():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    experts = Experts(CFG)
    tokens = torch.randn(60, CFG.dim, generator=torch.Generator().manual_seed(4))
    counts = torch.tensor([25, 0, 20, 15])  # expert 1 gets no token
    upstream = torch.randn(60, CFG.dim, generator=torch.Generator().manual_seed(5))
    results = []
    for grouped in (True, False):
        x = tokens.clone().requires_grad_()
        out = experts(x, counts, grouped=grouped)
        grads = torch.autograd.grad((out * upstream).sum(), [x, experts.gate_up_proj, experts.down_proj])
        results.append((out, *grads))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max().item() < 1e-5
    assert results[0][2][1].abs().max() == 0  # the idle expert's weights take part, with a zero gradient


def test_router_losses_at_the_formulas_fixed_points():
    cfg = replace(CFG, moe=replace(CFG.moe, top_k=1))
    layer = MoEFeedForward(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
    tokens = torch.randn(1, 64, CFG.dim, generator=torch.Generator().manual_seed(6))
    _, _, stats = layer(tokens)
    # Zero logits: every probability 1/E, z-loss (ln E)^2; top-1 of equal logits picks one expert for every
    # token, so f is one-hot and the balance loss is E * 1 * 1/E = 1 with P uniform.
    assert stats[STAT_Z].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert stats[STAT_BALANCE].item() == pytest.approx(1.0, rel=1e-6)
    assert sorted(stats[STAT_COUNTS:].tolist()) == [0.0, 0.0, 0.0, 64.0]
    with torch.no_grad():  # one expert takes every token with probability ~1: the loss reaches E
        layer.router.weight.zero_()
        layer.router.weight[0] = 1e4 * tokens[0].mean(dim=0).sign()
        tokens = tokens.abs() * tokens[0].mean(dim=0).sign()
    _, _, stats = layer(tokens)
    assert stats[STAT_BALANCE].item() == pytest.approx(4.0, rel=1e-4)
    # Uniform routing: 4 groups of tokens each sent with probability ~1 to its own expert.
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, CFG.dim) * 1e4)
        tokens = torch.zeros(1, 64, CFG.dim)
        tokens[0, torch.arange(64), torch.arange(64) % 4] = 1.0
    _, _, stats = layer(tokens)
    assert stats[STAT_COUNTS:].tolist() == [16.0] * 4
    assert stats[STAT_BALANCE].item() == pytest.approx(1.0, rel=1e-4)


def test_mixtral_8x7b_counts_total_and_active_parameters_as_transformers_and_the_formula():
    model = compose_pretrain_config(["+experiment=mixtral_8x7b"]).model
    config = transformers.MixtralConfig(**mixtral_config(model, 1, 2, 0, "bfloat16"))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.MixtralForCausalLM(config).parameters())
    assert count_parameters(model) == theirs == 46_702_792_704  # 46.7B, Mixtral's
    # Active: embeddings, attention, norms and router in full, 2 of the 8 experts of 3 * 4096 * 14336 each.
    attention = 2 * 4096 * 4096 + 2 * 4096 * 1024
    per_layer = attention + 2 * 3 * 4096 * 14336 + 8 * 4096 + 2 * 4096
    assert count_active_parameters(model) == 2 * 32000 * 4096 + 32 * per_layer + 4096 == 12_879_925_248
    dense = replace(model, moe=MoEConfig())  # 6N counts active parameters only
    extra_router = 32 * 8 * 4096
    active_over_dense = (flops_per_token(model, 8192) - flops_per_token(dense, 8192)) / 6
    assert active_over_dense == pytest.approx(count_active_parameters(model) - count_parameters(dense))
    assert count_active_parameters(model) - count_parameters(dense) == 32 * 3 * 4096 * 14336 + extra_router


@pytest.fixture(scope="module")
def tokenizer_dir(debug_artifacts) -> str:
    return compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"]).tokenizer.dir


@pytest.mark.slow
def test_export_is_a_mixtral_with_our_logits(tokenizer_dir, tmp_path):
    ours = model_with_weights(replace(CFG, vocab_size=512, sliding_window=16)).eval()
    out = write_hf_model(tmp_path / "hf", ours.state_dict(), ours.cfg, tokenizer_dir)
    config = json.loads((Path(out) / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == (
        "mixtral",
        4,
        2,
    )
    from safetensors import safe_open

    with safe_open(
        str(Path(out) / "model.safetensors"), "pt"
    ) as f:  # the published layout, one w1/w3/w2 each
        names = set(f.keys())
    assert {
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
    } <= names
    assert not any(".mlp." in n for n in names)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    batch = packed_batch()
    with torch.no_grad():
        assert (theirs(batch["input_ids"]).logits - ours(batch["input_ids"])).abs().max().item() <= 1e-4
        packed = theirs(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        want = ours(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    assert (packed - want).abs().max().item() <= 1e-4


def test_a_model_with_dense_layers_between_experts_is_refused_by_the_mixtral_export():
    cfg = replace(CFG, moe=replace(CFG.moe, every_n_layers=2))
    assert [block.is_moe for block in Transformer(cfg).layers] == [False, True]
    with pytest.raises(ExportError, match="every_n_layers"):
        mixtral_config(cfg, 1, 2, 0, "float32")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.moe.num_experts=-1", "model.moe.num_experts"),
        ("model.moe.top_k=1", "model.moe.top_k"),  # read only with experts
        ("+model.moe.num_experts=4 model.moe.top_k=5", "model.moe.top_k"),
        ("+model.moe.num_experts=4 model.moe.load_balance_coef=-1", "model.moe.load_balance_coef"),
        ("deepspeed.expert_parallel_size=2", "deepspeed.expert_parallel_size"),  # a dense model
        ("model.moe.num_experts=4 deepspeed.expert_parallel_size=3", "deepspeed.expert_parallel_size"),
        ("model.moe.num_experts=4 deepspeed.expert_parallel_size=-1", "deepspeed.expert_parallel_size"),
        (
            "model.moe.num_experts=4 deepspeed.expert_parallel_size=2 deepspeed.zero_stage=2",
            "deepspeed.expert_parallel_size",
        ),
    ],
)
def test_moe_settings_are_validated_with_their_key(override, key):
    overrides = [o.lstrip("+") for o in override.split()]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_pretrain_config(["+experiment=debug", *overrides])
