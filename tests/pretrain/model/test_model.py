"""The LLaMA-style model: parameter count, document masking, GQA, RoPE, the chunked loss, checkpointing hooks."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.model import transformer as model_module
from pretrain.model.config import ModelConfigError as ConfigError  # the model reports its own config errors
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.model.rope import positions_from_documents, rope_tables
from pretrain.model.transformer import Transformer

TINY = ModelConfig(
    name="test", vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64, loss_chunk_size=0
)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(TINY, **overrides)).float()


def paper_count(vocab: int, dim: int, ffn: int, layers: int) -> int:
    """P = 2VH + L(4H^2 + 3HH' + 2H) + H: multi-head attention, untied embeddings."""
    return 2 * vocab * dim + layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim) + dim


# -- size ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab", "dim", "ffn", "layers", "heads"),
    [(97, 32, 48, 2, 4), (1000, 64, 172, 3, 8), (32000, 4096, 11008, 32, 32), (32000, 5120, 13824, 40, 40)],
)
def test_parameter_count_matches_formula(vocab, dim, ffn, layers, heads):
    cfg = ModelConfig(vocab_size=vocab, dim=dim, ffn_dim=ffn, n_layers=layers, n_heads=heads)
    assert count_parameters(cfg) == paper_count(vocab, dim, ffn, layers)


def test_llama2_7b_parameter_count():
    # 2*32000*4096 = 262,144,000; per layer 4*4096^2 + 3*4096*11008 + 2*4096 = 202,383,360; x32 + 4096.
    assert 262_144_000 + 32 * 202_383_360 + 4096 == 6_738_415_616
    cfg = ModelConfig(vocab_size=32000, dim=4096, ffn_dim=11008, n_layers=32, n_heads=32, max_seq_len=4096)
    assert count_parameters(cfg) == 6_738_415_616


def test_tied_and_gqa_counts():
    untied = count_parameters(TINY)
    assert count_parameters(replace(TINY, tie_embeddings=True)) == untied - TINY.vocab_size * TINY.dim
    # Two kv heads of width 8 instead of four: k and v lose 2 * 32 * 16 per layer.
    assert count_parameters(replace(TINY, n_kv_heads=2)) == untied - 2 * (2 * 32 * 16)


def test_flops_per_token_convention():
    cfg = replace(TINY, n_layers=3)
    non_embedding = count_parameters(cfg) - cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 64) == 6 * non_embedding + 12 * 3 * 32 * 64
    # Tying removes the input embedding only; the output projection still costs FLOPs.
    assert flops_per_token(replace(cfg, tie_embeddings=True), 64) == flops_per_token(cfg, 64)


def test_causal_flops_count_half_the_attention_square():
    """By hand for the 7B at 32K: 6N = 6 * 6.476e9 (6.738e9 less the 32000 x 4096 input embedding); the full
    square adds 12 * 32 layers * 4096 * 32768 = 5.154e13 per token (more than 6N), the causal half 2.577e13."""
    cfg = ModelConfig(name="7b", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008)
    six_n = 6 * (6_738_415_616 - 32000 * 4096)
    assert flops_per_token(cfg, 32768) == six_n + 51_539_607_552
    assert flops_per_token(cfg, 32768, attention="causal") == six_n + 25_769_803_776
    assert six_n < 51_539_607_552  # at 32K the full-square attention term exceeds 6N
    with pytest.raises(ValueError, match="'full' or 'causal'"):
        flops_per_token(cfg, 128, attention="half")


def test_scaled_initialization():
    model = build(n_layers=8, dim=256, n_heads=4, ffn_dim=256)
    std = model.cfg.init_std
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.03)
    assert model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.03)
    for out in (model.layers[3].attn.o_proj, model.layers[5].mlp.down_proj):
        assert out.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.03)
    assert torch.equal(model.norm.weight, torch.ones(256))


# -- attention ---------------------------------------------------------------------------------------------


def packed_batch(lengths: list[int], total: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, TINY.vocab_size, (n,), generator=gen) for n in lengths]
    pad = total - sum(lengths)
    input_ids = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[
        None
    ]
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    return docs, input_ids, document_ids, position_ids


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_documents_do_not_attend_across(backend):
    if backend == "flex" and model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    model = build(attention=backend).eval()
    docs, input_ids, document_ids, position_ids = packed_batch([5, 9, 4], total=20)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        packed = model(input_ids, position_ids=position_ids, document_ids=document_ids)
        start = 0
        for doc in docs:
            alone = model(doc[None])
            torch.testing.assert_close(packed[:, start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
            start += len(doc)
        # The same sequence without boundaries must differ (the mask does something).
        causal = model(input_ids)
    assert not torch.allclose(causal[:, 5:14], packed[:, 5:14], atol=1e-3)


def test_flex_matches_mask_path_with_gqa():
    if model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    _, input_ids, document_ids, position_ids = packed_batch([7, 3, 10], total=24)
    outputs = []
    for backend in ("sdpa", "flex"):
        model = build(attention=backend, n_kv_heads=2).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs.append(model(input_ids, position_ids=position_ids, document_ids=document_ids))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_on_cuda_matches_mask_path_in_loss_and_grads():
    if model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    _, input_ids, document_ids, position_ids = packed_batch([70, 30, 100], total=256)
    batch = [t.cuda() for t in (input_ids, position_ids, document_ids, torch.roll(input_ids, -1, dims=1))]
    losses, grads = [], []
    for backend in ("sdpa", "auto"):  # auto picks compiled flex on CUDA
        model = build(attention=backend, n_kv_heads=2, max_seq_len=256).cuda()
        loss = model(*batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.layers[0].attn.k_proj.weight.grad)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_positions_derived_from_documents_when_missing():
    model = build().eval()
    _, input_ids, document_ids, position_ids = packed_batch([6, 6, 5], total=20)
    with torch.no_grad():
        given_positions = model(input_ids, position_ids=position_ids, document_ids=document_ids)
        derived = model(input_ids, document_ids=document_ids)
    torch.testing.assert_close(given_positions, derived)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6))
def test_positions_from_documents_restart_at_each_document(lengths):
    document_ids = torch.cat([torch.full((n,), i % 2 + 3 * (i // 2)) for i, n in enumerate(lengths)])[None]
    expected = torch.cat([torch.arange(n) for n in lengths])[None]
    assert torch.equal(positions_from_documents(document_ids), expected)


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    gqa = build(n_kv_heads=2).eval()
    mha = build(seed=5).eval()
    state = gqa.state_dict()
    groups, head_dim = TINY.n_heads // 2, TINY.head_dim
    for i in range(TINY.n_layers):
        for proj in ("k_proj", "v_proj"):
            key = f"layers.{i}.attn.{proj}.weight"
            state[key] = (
                state[key].view(2, head_dim, TINY.dim).repeat_interleave(groups, dim=0).reshape(-1, TINY.dim)
            )
    mha.load_state_dict(state)
    input_ids = torch.randint(0, TINY.vocab_size, (2, 12))
    _, _, document_ids, position_ids = packed_batch([4, 8], total=12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(input_ids), mha(input_ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            gqa(input_ids[:1], position_ids, document_ids),
            mha(input_ids[:1], position_ids, document_ids),
            atol=1e-5,
            rtol=1e-5,
        )


def test_tied_embeddings_share_one_tensor():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    input_ids = torch.randint(0, TINY.vocab_size, (1, 8))
    model(input_ids, labels=input_ids).backward()
    assert model.embed_tokens.weight.grad is not None


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        build()(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


# -- RoPE ----------------------------------------------------------------------------------------------------


def test_rope_interpolation_divides_positions():
    positions = torch.arange(0, 40)[None]
    cos, sin = rope_tables(positions, 16, 10000.0)
    cos1, sin1 = rope_tables(positions, 16, 10000.0, scaling=1.0)
    assert torch.equal(cos, cos1) and torch.equal(sin, sin1)
    cos4, sin4 = rope_tables(positions * 4, 16, 10000.0, scaling=4.0)
    torch.testing.assert_close(cos4, cos)
    torch.testing.assert_close(sin4, sin)
    # Position p under factor s equals the unscaled table at the fractional position p / s.
    cos_frac, _ = rope_tables(positions / 4, 16, 10000.0)
    cos_s, _ = rope_tables(positions, 16, 10000.0, scaling=4.0)
    torch.testing.assert_close(cos_s, cos_frac)


def test_rope_base_scaling_multiplies_the_base():
    input_ids = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        scaled = build(rope_base_scaling=8.0).eval()(input_ids)
        bigger_base = build(rope_base=80000.0).eval()(input_ids)
        default = build().eval()(input_ids)
    torch.testing.assert_close(scaled, bigger_base)
    assert not torch.allclose(scaled, default)


def test_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = replace(TINY, n_kv_heads=2, rope_scaling=2.0, norm_eps=1e-6)
    ours = build(n_kv_heads=2, rope_scaling=2.0, norm_eps=1e-6).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": cfg.rope_base},
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn."}
    state = {}
    for name, tensor in ours.state_dict().items():
        if name.startswith("lm_head"):
            state[name] = tensor
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        state[f"model.{name}"] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in key for key in missing)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), hf(input_ids).logits, atol=1e-5, rtol=1e-4)


# -- loss --------------------------------------------------------------------------------------------------


def test_chunked_loss_equals_unchunked_cross_entropy_and_ignores_masked_labels():
    input_ids = torch.randint(0, TINY.vocab_size, (2, 20))
    labels = torch.randint(0, TINY.vocab_size, (2, 20))
    labels[0, :7] = -100
    labels[1, 15:] = -100
    whole, chunked = build(), build(loss_chunk_size=7)
    with torch.no_grad():
        logits = whole(input_ids)
    expected = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), labels.reshape(-1), ignore_index=-100)
    loss_whole = whole(input_ids, labels=labels)
    loss_chunked = chunked(input_ids, labels=labels)
    torch.testing.assert_close(loss_whole, expected)
    torch.testing.assert_close(loss_chunked, expected)
    loss_whole.backward()
    loss_chunked.backward()
    for a, b in zip(whole.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_ignored_positions_do_not_affect_the_loss():
    model = build()
    input_ids = torch.randint(0, TINY.vocab_size, (1, 10))
    labels = torch.randint(0, TINY.vocab_size, (1, 10))
    labels[0, 4:] = -100
    with torch.no_grad():
        reference = model(input_ids[:, :4], labels=labels[:, :4])
        masked = model(input_ids, labels=labels)
        nothing = model(input_ids, labels=torch.full_like(labels, -100))
    torch.testing.assert_close(masked, reference)
    assert nothing.item() == 0.0


def test_loss_at_initialization_is_about_ln_vocab():
    model = build(vocab_size=500)
    input_ids = torch.randint(0, 500, (4, 32))
    with torch.no_grad():
        loss = model(input_ids, labels=torch.roll(input_ids, -1, dims=1))
    assert abs(loss.item() - math.log(500)) < 0.1


# -- activation checkpointing -------------------------------------------------------------------------------


@pytest.mark.parametrize("every_n", [1, 2])
def test_activation_checkpointing_hook_gives_identical_grads(every_n):
    _, input_ids, document_ids, position_ids = packed_batch([8, 8], total=16)
    labels = torch.roll(input_ids, -1, dims=1)
    calls = []

    def counting_checkpoint(fn, *args):
        calls.append(fn)
        return checkpoint(fn, *args, use_reentrant=False)

    grads = []
    for fn in (None, counting_checkpoint, functools.partial(checkpoint, use_reentrant=True)):
        model = build(n_layers=4, loss_chunk_size=5)
        model.set_activation_checkpointing(fn, every_n)
        model(input_ids, position_ids, document_ids, labels).backward()
        grads.append([p.grad for p in model.parameters()])
        if fn is counting_checkpoint:
            assert calls == [model.layers[i] for i in range(0, 4, every_n)]
    for reference, other in ((grads[0], grads[1]), (grads[0], grads[2])):
        for a, b in zip(reference, other, strict=True):
            assert torch.equal(a, b)


# -- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_heads": 5}, "model.n_heads"),
        ({"dim": 48, "n_heads": 16}, "model.n_heads"),  # head_dim 3 is odd: RoPE needs pairs
        ({"n_kv_heads": 3}, "model.n_kv_heads"),
        ({"n_kv_heads": 0}, "model.n_kv_heads"),
        ({"attention": "flash"}, "model.attention"),
        ({"rope_scaling": 0.0}, "model.rope_scaling"),
        ({"vocab_size": 0}, "model.vocab_size"),
        ({"loss_chunk_size": -1}, "model.loss_chunk_size"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    cfg = replace(TINY, **overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()
    with pytest.raises(ConfigError):
        Transformer(cfg)


def test_config_error_uses_the_given_key():
    with pytest.raises(ConfigError, match=r"^experiment\.model\.n_heads: must divide experiment\.model\.dim"):
        replace(TINY, n_heads=5).validate("experiment.model")
