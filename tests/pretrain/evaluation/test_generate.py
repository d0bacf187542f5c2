"""Generation: the KV cache against full recomputation, the sampling filters, and the CLI on a real debug run."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.cli import compose_conf, to_config
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import load_trained
from pretrain.config import ModelConfig
from pretrain.evaluation.cli import run_argument
from pretrain.evaluation.generate import (
    GenerateConfig,
    SamplingConfig,
    continuation,
    encode_prompt,
    filter_logits,
    generate,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from pretrain.model.kv_cache import KVCache
from pretrain.model.transformer import Transformer
from tests.helpers import ROOT

TINY = ModelConfig(
    name="test",
    vocab_size=97,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=48,
    max_seq_len=64,
    loss_chunk_size=0,
)
GREEDY = SamplingConfig(max_new_tokens=20, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).float().eval()


def prompt(length: int = 7, seed: int = 1) -> list[int]:
    return torch.randint(
        0, TINY.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


# -- the KV cache -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_cached_decoding_matches_full_recompute_step_by_step(model):
    tokens = torch.tensor([prompt()])
    cache = KVCache(TINY, batch=1)
    step_input = tokens
    for _ in range(20):
        cached = model(step_input, cache=cache)[:, -1]
        full = model(tokens)[:, -1]
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
        next_id = cached.argmax(-1)
        assert int(next_id) == int(full.argmax(-1))
        step_input = next_id.view(1, 1)
        tokens = torch.cat([tokens, step_input], dim=1)
    assert cache.length == tokens.shape[1] - 1


def test_generate_with_and_without_cache_agree(model):
    for sampling in (GREEDY, SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=3)):
        cached = generate(model, prompt(), sampling, use_cache=True)
        recomputed = generate(model, prompt(), sampling, use_cache=False)
        assert cached == recomputed
        assert len(cached) == 20


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 29), max_size=4, unique=True), batch=st.integers(1, 2))
@torch.no_grad()
def test_any_chunking_of_a_sequence_gives_the_full_logits(model, cuts, batch):
    """Prefill and decode in arbitrary chunks (several tokens after a filled cache exercise the offset mask)."""
    ids = torch.randint(0, TINY.vocab_size, (batch, 30), generator=torch.Generator().manual_seed(len(cuts)))
    bounds = [0, *sorted(cuts), 30]
    cache = KVCache(TINY, batch=batch)
    pieces = [model(ids[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids), rtol=0, atol=1e-5)


def test_cache_refuses_to_overflow_and_packed_batches(model):
    cache = KVCache(TINY, batch=1, capacity=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="capacity of 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="document_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), document_ids=torch.zeros(1, 2), cache=KVCache(TINY, 1))


def test_generation_uses_the_unmasked_sdpa_paths(model, monkeypatch):
    """Prefill is causal SDPA without a mask; each decoded token attends to the whole cache without a mask."""
    from pretrain.model import transformer as model_module

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    generate(model, prompt(7), replace(GREEDY, max_new_tokens=3))
    per_layer = calls[:: TINY.n_layers]
    assert per_layer == [(7, 7, True, True), (1, 8, True, False), (1, 9, True, False)]


def test_cache_is_sized_to_the_prompt_and_new_tokens_in_the_keys_dtype(model, monkeypatch):
    """The cache holds prompt + new - 1 positions (the last token is never fed back), the exact number the
    overflow check allows; a bf16 forward stores bf16 keys (half an fp32 cache)."""
    from pretrain.evaluation import generate as generate_module

    made = []

    class RecordedCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generate_module, "KVCache", RecordedCache)
    new = generate(model, prompt(7), replace(GREEDY, max_new_tokens=5))
    assert len(new) == 5 and made[-1].capacity == 7 + 5 - 1 < TINY.max_seq_len
    assert made[-1].keys.shape == (TINY.n_layers, 1, TINY.kv_heads, 11, TINY.head_dim)
    assert new == generate(model, prompt(7), replace(GREEDY, max_new_tokens=5), use_cache=False)
    half = Transformer(TINY).to(torch.bfloat16).eval()
    generate(half, prompt(7), replace(GREEDY, max_new_tokens=2))
    assert made[-1].keys.dtype == torch.bfloat16 and made[-1].values.dtype == torch.bfloat16


def test_training_forward_is_unchanged_without_a_cache(model):
    """The cache-free path is the training path: the loss still matches a plain cross-entropy on the logits."""
    ids = torch.tensor([prompt(16)])
    labels = torch.tensor([prompt(16, seed=2)])
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, TINY.vocab_size), labels.view(-1))
    torch.testing.assert_close(model(ids, labels=labels), expected)


# -- stopping ---------------------------------------------------------------------------------------------


def test_stops_at_eos_and_at_the_context_limit(model):
    first = generate(model, prompt(), GREEDY)[0]
    assert generate(model, prompt(), GREEDY, eos_id=first) == [first]
    long_prompt = prompt(60)
    assert len(generate(model, long_prompt, GREEDY)) == TINY.max_seq_len - 60
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt(64), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], GREEDY)


# -- prompts ----------------------------------------------------------------------------------------------


def test_prompts_start_like_training_documents():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data.tokenize_pool import encode_documents
    from data.tokenizer import TokenizerInfo

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, "def": 4, "f": 5, "(": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>", "<unk>"])
    info = TokenizerInfo(Path("."), "bpe", len(vocab), "", bos_id=0, eos_id=1, pad_id=2, unk_id=3)
    # A training document is [BOS] + ids + [EOS]; a prompt is that document before its EOS.
    document, _ = encode_documents(tokenizer, ["def f ("], info.eos_id, np.dtype(np.int64), info.bos_id)
    assert encode_prompt(tokenizer, info, "def f (") == document[:-1].tolist() == [0, 4, 5, 6]
    assert encode_prompt(tokenizer, info, "") == [info.bos_id]
    assert continuation(tokenizer, [info.bos_id], [4, 5]) == "def f"


# -- sampling ---------------------------------------------------------------------------------------------


def test_top_k_one_equals_greedy(model):
    greedy = generate(model, prompt(), GREEDY)
    for seed in range(3):
        sampled = generate(
            model, prompt(), SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=seed)
        )
        assert sampled == greedy


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(temperature=0.0, top_k=3, top_p=0.2)
    assert torch.equal(sample_next(logits, sampling), logits.argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    first = generate(model, prompt(), sampling)
    assert generate(model, prompt(), sampling) == first
    assert generate(model, prompt(), replace(sampling, seed=8)) != first


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).squeeze().tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)


@pytest.mark.parametrize(
    ("p", "kept"),
    [(0.3, {2}), (0.45, {2}), (0.7, {2, 0}), (0.9, {2, 0, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    # Probabilities 0.3, 0.05, 0.5, 0.15 in an unsorted order: ranked 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05).
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15]])
    filtered = top_p_filter(probs.log(), p)
    assert set(torch.isfinite(filtered[0]).nonzero().flatten().tolist()) == kept
    renormalized = torch.softmax(filtered, dim=-1)[0]
    expected = torch.zeros(4)
    expected[list(kept)] = probs[0, list(kept)] / probs[0, list(kept)].sum()
    torch.testing.assert_close(renormalized, expected)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.01, 0.99), vocab=st.integers(2, 40))
def test_top_p_property_minimal_prefix_of_the_sorted_distribution(seed, p, vocab):
    logits = 3 * torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(top_p_filter(logits, p))
    probs = torch.softmax(logits, dim=-1)
    for row in range(3):
        mass = probs[row][kept[row]]
        assert mass.sum() >= p - 1e-5  # enough mass
        assert mass.sum() - mass.min() < p + 1e-5  # and not one token more than needed
        dropped = probs[row][~kept[row]]
        assert dropped.numel() == 0 or dropped.max() <= mass.min() + 1e-7  # and the most likely ones


def test_temperature_scales_logits_and_sampling_follows_it():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        torch.testing.assert_close(filter_logits(logits, temperature), logits / temperature)
        draws = 20_000
        generator = torch.Generator().manual_seed(0)
        tokens = sample_next(logits.expand(draws, 4), SamplingConfig(temperature=temperature), generator)
        frequencies = torch.bincount(tokens, minlength=4).float() / draws
        torch.testing.assert_close(frequencies, torch.softmax(logits / temperature, -1), rtol=0, atol=0.015)
    sharp = torch.softmax(filter_logits(logits, 0.5), -1)[0]
    flat = torch.softmax(filter_logits(logits, 2.0), -1)[0]
    assert sharp > torch.softmax(logits, -1)[0] > flat


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": -1}]
)
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad).validate()


# -- command line -----------------------------------------------------------------------------------------


def test_command_line_is_hydra_with_a_leading_run_path():
    assert run_argument(["runs/x", "top_p=0.5"]) == ["run='runs/x'", "top_p=0.5"]
    assert run_argument(["run=runs/x"]) == ["run=runs/x"]
    assert run_argument(["runs/it's"]) == ["run='runs/it\\'s'"]
    cfg = to_config(
        compose_conf("generate", run_argument(["runs/x", 'prompt="Once upon a=time, (b"', "max_new_tokens=5",
                                               "top_p=0.5", "prompts=[Hi]", "dtype=bfloat16"])),
        GenerateConfig,
    )  # fmt: skip
    assert cfg.run == "runs/x"
    assert cfg.all_prompts() == ["Once upon a=time, (b", "Hi"]
    assert (cfg.max_new_tokens, cfg.top_p, cfg.temperature, cfg.dtype) == (5, 0.5, 1.0, "bf16")
    assert math.isclose(
        to_config(compose_conf("generate", ["run=r", "temperature=0"]), GenerateConfig).temperature, 0.0
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.generate", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_prints_a_continuation_of_the_prompt(debug_run):
    args = (
        str(debug_run),
        'prompt="def main("',
        "max_new_tokens=12",
        "temperature=0.8",
        "top_k=50",
        "seed=1",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main(")
    assert len(result.stdout.rstrip("\n")) > len("def main(")
    assert run_cli(*args).stdout == result.stdout  # seeded: the same text again


def test_cli_reports_a_missing_run(tmp_path):
    result = run_cli(str(tmp_path / "nowhere"), "prompt=x")
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_trained_model_cached_greedy_matches_recompute(debug_run):
    model, cfg, _ = load_trained(debug_run)
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    ids = tokenizer.encode("def main(", add_special_tokens=False).ids
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    cached = generate(model, ids, sampling, info.eos_id)
    assert cached == generate(model, ids, sampling, info.eos_id, use_cache=False)
    hello, world = (tokenizer.encode(text, add_special_tokens=False).ids for text in ("Hello", " world"))
    assert continuation(tokenizer, hello, world) == " world"
