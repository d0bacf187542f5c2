"""RoPE for long contexts: position interpolation, a base change (ABF) and YaRN, checked against transformers.

Each method is exported with `write_hf_model` from a tiny model whose `max_seq_len` is 3 or 4 times its
original window, loaded back with `LlamaForCausalLM`, and the logits past the window must agree to 1e-4 in
fp32. Weights are drawn large enough (and norms perturbed) that the rotation visibly moves the logits, so a
wrong method would fail, not pass by accident. YaRN's frequencies are also compared directly with
transformers' own function, and plain RoPE with the textbook formula, bit for bit.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace

import pytest
import torch

from data.config import ConfigError
from pretrain.config import ModelConfig, compose_pretrain_config
from pretrain.evaluation.export import write_hf_model
from pretrain.model.config import ModelConfigError
from pretrain.model.kv_cache import KVCache
from pretrain.model.rope import Yarn, rope_tables, yarn_frequencies
from pretrain.model.transformer import Transformer

WINDOW = 64  # the "original" pretraining window of the tiny models
TOLERANCE = 1e-4

# head_dim 16: with the default betas YaRN's ramp covers pairs 0 to 3 of 8 over a window of 64.
TINY = ModelConfig(
    name="t",
    vocab_size=512,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=96,
    max_seq_len=4 * WINDOW,
    init_std=0.2,
    loss_chunk_size=0,
)
YARN = dict(rope_type="yarn", rope_scaling=4.0, rope_original_max_seq_len=WINDOW)


def reference_tables(
    positions: torch.Tensor, head_dim: int, base: float, scaling: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook rotate-half RoPE: angle p / s * base^(-2i / d), each pair's angle repeated in both halves;
    in fp32 it is the model's implementation before YaRN was added, operation for operation."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = (positions.to(dtype) / scaling)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random fp32 weights with norm weights away from 1, so that a norm in the wrong place shows."""
    torch.manual_seed(seed)
    model = Transformer(cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


# -- plain RoPE is unchanged -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "base", "scaling"), [(16, 10000.0, 1.0), (128, 500000.0, 1.0), (64, 1e4, 4.0)]
)
def test_plain_rope_is_the_textbook_formula_bit_for_bit(head_dim, base, scaling):
    """Factor 1.0 (and a power of two, where dividing positions or frequencies rounds alike) is exact."""
    positions = torch.arange(0, 3000, 7)[None].expand(2, -1)
    expected = reference_tables(positions, head_dim, base, scaling)
    assert all(map(torch.equal, rope_tables(positions, head_dim, base, scaling), expected))
    # YaRN with factor 1.0 is off: the same tables, not merely close ones.
    plain = reference_tables(positions, head_dim, base)
    assert all(map(torch.equal, rope_tables(positions, head_dim, base, 1.0, Yarn(64)), plain))


def test_linear_interpolation_rotates_position_p_as_p_over_the_factor():
    positions = torch.arange(0, 300)[None]
    cos, sin = rope_tables(positions, 32, 10000.0, 3.0)
    exact = reference_tables(positions, 32, 10000.0, 3.0, dtype=torch.float64)
    torch.testing.assert_close(cos.double(), exact[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), exact[1], rtol=0, atol=1e-5)


def test_yarn_with_factor_one_is_the_default_model_bit_for_bit():
    input_ids = torch.randint(
        0, TINY.vocab_size, (2, TINY.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        default = build(TINY)(input_ids)
        off_cfg = replace(
            TINY, **{**YARN, "rope_scaling": 1.0, "rope_original_max_seq_len": TINY.max_seq_len}
        )
        off = build(off_cfg)(input_ids)
    assert torch.equal(default, off)


# -- YaRN's frequencies against transformers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "base", "factor", "window", "beta_fast", "beta_slow", "attention_factor"),
    [
        (16, 10000.0, 4.0, 64, 32.0, 1.0, None),
        (128, 10000.0, 8.0, 8192, 32.0, 1.0, None),  # OLMo-3-like: 8k window, factor 8
        (128, 500000.0, 16.0, 8192, 32.0, 1.0, None),  # with a changed base
        (64, 1e6, 3.5, 4096, 16.0, 2.0, None),  # non-integer factor, other betas
        (32, 10000.0, 2.0, 256, 32.0, 1.0, 1.25),  # an explicit attention factor
        (16, 10000.0, 4.0, 2, 32.0, 1.0, None),  # a window so short that every pair is kept
        (16, 10.0, 4.0, 100000, 32.0, 1.0, None),  # so long that the upper bound is clamped
    ],
)
def test_yarn_frequencies_and_attention_factor_equal_transformers(
    head_dim, base, factor, window, beta_fast, beta_slow, attention_factor
):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = dict(
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=window,
        rope_theta=base,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    if attention_factor is not None:
        parameters["attention_factor"] = attention_factor
    hf_config = transformers.LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=int(window * factor),
        rope_parameters=parameters,
    )
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours, our_factor = yarn_frequencies(
        head_dim, base, factor, Yarn(window, beta_fast, beta_slow, attention_factor)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    original = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    inv_freq, attention = yarn_frequencies(128, 10000.0, 8.0, Yarn(4096))
    turns = 4096 * original / (2 * math.pi)
    fast, slow = turns >= 32, turns <= 1
    assert fast.any() and slow.any() and not (fast | slow).all()
    assert torch.equal(inv_freq[fast], original[fast])
    torch.testing.assert_close(inv_freq[slow], original[slow] / 8.0)
    assert attention == pytest.approx(0.1 * math.log(8.0) + 1.0)
    # cos and sin carry the attention factor, so a query-key product scales by its square
    positions = torch.arange(10)[None]
    cos, sin = rope_tables(positions, 128, 10000.0, 8.0, Yarn(4096))
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, attention**2))


# -- each method exported and run by transformers -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(debug_artifacts) -> str:
    return compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"]).tokenizer.dir


def hf_yarn(factor: float = 4.0, beta_fast: float = 32.0, beta_slow: float = 1.0, **extra) -> dict:
    """The `rope_scaling` entry the export should write for YaRN over WINDOW."""
    return dict(
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=WINDOW,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        **extra,
    )


# method: (ModelConfig overrides, rope_theta and rope_scaling the export must write)
METHODS = {
    "linear": (dict(rope_scaling=4.0), 1e4, {"rope_type": "linear", "factor": 4.0}),
    "linear-factor-3": (dict(rope_scaling=3.0), 1e4, {"rope_type": "linear", "factor": 3.0}),
    "abf": (dict(rope_base=500000.0), 500000.0, None),
    "abf-by-multiplier": (dict(rope_base_scaling=100.0), 1e6, None),
    "linear-abf": (dict(rope_scaling=4.0, rope_base=1e6), 1e6, {"rope_type": "linear", "factor": 4.0}),
    "yarn": (YARN, 1e4, hf_yarn()),
    "yarn-factor-3": (dict(YARN, rope_scaling=3.0, max_seq_len=3 * WINDOW), 1e4, hf_yarn(3.0)),
    "yarn-abf": (dict(YARN, rope_base=500000.0), 500000.0, hf_yarn()),
    # head_dim 32 and narrow betas put the ramp on pairs 1 to 7 of 16; an explicit attention factor.
    "yarn-betas-attention": (
        dict(
            YARN, n_heads=2, n_kv_heads=1, yarn_beta_fast=4.0, yarn_beta_slow=0.25, yarn_attention_factor=1.3
        ),
        1e4,
        hf_yarn(beta_fast=4.0, beta_slow=0.25, attention_factor=1.3),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_exported_long_context_methods_match_transformers_past_the_window(method, tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    overrides, theta, hf_scaling = METHODS[method]
    cfg = replace(TINY, **overrides)
    model = build(cfg)
    out = write_hf_model(tmp_path / "hf", model.state_dict(), cfg, tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == theta and config["rope_scaling"] == hf_scaling
    assert config["max_position_embeddings"] == cfg.max_seq_len
    if hf_scaling is not None and hf_scaling["rope_type"] == "yarn":
        # transformers 4.51-4.55 take YaRN's factor from this ratio, later versions from `factor`: both agree.
        assert hf_scaling["factor"] == cfg.max_seq_len / hf_scaling["original_max_position_embeddings"]

    input_ids = torch.randint(
        0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(input_ids), hf(input_ids).logits
        plain_cfg = replace(TINY, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.max_seq_len)
        plain = Transformer(plain_cfg).float().eval()
        plain.load_state_dict(model.state_dict())
        unscaled = plain(input_ids)
    past = slice(WINDOW, None)
    difference = (theirs - ours)[:, past].abs().max().item()
    print(f"{method}: max |transformers - ours| past the window = {difference:.2e}")
    assert difference <= TOLERANCE
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    # The test can tell methods apart: plain RoPE with the same weights is far off.
    assert (unscaled - ours)[:, past].abs().max().item() > 100 * TOLERANCE


# -- generation and configuration ----------------------------------------------------------------------------


@torch.no_grad()
def test_cached_decoding_past_the_window_matches_the_full_forward_with_yarn():
    cfg = replace(TINY, **YARN)
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = KVCache(cfg, batch=2)
    bounds = [0, WINDOW - 3, WINDOW + 5, *range(WINDOW + 6, WINDOW + 12), 3 * WINDOW]
    pieces = [model(ids[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    # fp32 rounding of another summation order (the cached pieces against one causal pass): 1.4e-5 was seen on an
    # Intel Xeon with AMX, below 1e-5 on an AMD EPYC; a position or scaling error is orders of magnitude larger.
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(rope_type="ntk"), "model.rope_type"),
        (dict(rope_type="yarn", rope_scaling=4.0), "model.rope_original_max_seq_len"),
        (dict(YARN, rope_original_max_seq_len=0), "model.rope_original_max_seq_len"),
        (dict(YARN, rope_scaling=0.5), "model.rope_scaling"),
        (dict(YARN, yarn_beta_fast=1.0), "model.yarn_beta_fast"),
        (dict(YARN, yarn_beta_slow=0.0), "model.yarn_beta_slow"),
        (dict(YARN, yarn_attention_factor=0.0), "model.yarn_attention_factor"),
        # YaRN's factor must be the extension ratio max_seq_len / rope_original_max_seq_len (here 4)
        (dict(YARN, rope_scaling=8.0), "model.rope_scaling"),
        (dict(YARN, max_seq_len=2 * WINDOW), "model.rope_scaling"),
        (dict(YARN, rope_scaling=1.0), "model.rope_scaling"),
        # YaRN's keys are refused with linear scaling instead of being ignored
        (dict(rope_scaling=4.0, rope_original_max_seq_len=WINDOW), "model.rope_original_max_seq_len"),
        (dict(yarn_beta_fast=16.0), "model.yarn_beta_fast"),
        (dict(yarn_attention_factor=1.2), "model.yarn_attention_factor"),
    ],
)
def test_rope_config_errors_name_the_key(overrides, key):
    with pytest.raises(ModelConfigError, match="^" + re.escape(key) + ": "):
        replace(TINY, **overrides).validate()


def test_yarn_composes_from_the_command_line():
    base = ["+experiment=debug", "model.rope_type=yarn", "model.rope_scaling=4"]
    cfg = compose_pretrain_config([*base, "model.rope_original_max_seq_len=16", "model.yarn_beta_fast=16"])
    model = cfg.model  # the debug model's window is 64: 4 times the original 16
    assert (model.rope_scaling, model.rope_original_max_seq_len, model.yarn_beta_fast) == (4.0, 16, 16.0)
    assert Yarn.of(model) == Yarn(16, 16.0, 1.0, None)
    with pytest.raises(ConfigError, match=r"model\.rope_original_max_seq_len"):
        compose_pretrain_config(base)
    # A factor other than max_seq_len / rope_original_max_seq_len is refused with the value to set: 64 / 32.
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling: .*set model\.rope_scaling=2\.0 "):
        compose_pretrain_config([*base, "model.rope_original_max_seq_len=32"])
