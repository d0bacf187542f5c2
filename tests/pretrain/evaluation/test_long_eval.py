"""The long-context harness measures what it claims: exact prompts, exact scoring, exact averages.

Models here are real `Transformer`s: small random ones for the losses, and one whose weights are set so that its
greedy continuation is known in advance, for the passkey scoring. The last test runs the command on the shared
debug run.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import ConfigError
from data.packing import ArrayDocumentStore
from data.tokenizer import load_tokenizer
from pretrain.config import ModelConfig, compose_pretrain_config
from pretrain.evaluation.evaluate import EvaluateConfig, main, wants_long_context
from pretrain.evaluation.long_eval import (
    PasskeyTemplate,
    answer_digits,
    build_passkey_prompt,
    copy_probe,
    copy_sequences,
    default_buckets,
    document_prefixes,
    ordinary_token_ids,
    passkey_correct,
    passkey_grid,
    passkey_keys,
    position_loss,
)
from pretrain.evaluation.long_report import LongContextSettings, long_context_report
from pretrain.model.transformer import Transformer
from tests.helpers import ROOT

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_and_info(debug_artifacts):
    cfg = compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"])
    return load_tokenizer(cfg.tokenizer.dir)


def small_model(max_seq_len: int = 128, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=max_seq_len
    )
    return Transformer(cfg).eval()


def direct_token_losses(model: Transformer, tokens: np.ndarray) -> torch.Tensor:
    """-log p(token t + 1 | tokens <= t) from the full logits, without the harness's code."""
    tokens = torch.from_numpy(tokens)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1]).double(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# -- passkey prompts and scoring ------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [True, False])
def test_passkey_prompt_has_the_asked_length_and_the_key_at_the_asked_depth(tokenizer_and_info, bos):
    tokenizer, info = tokenizer_and_info
    template = PasskeyTemplate()
    bos_id = info.bos_id if bos else None
    prefix = ([info.bos_id] if bos else []) + encode(tokenizer, template.intro)
    question = encode(tokenizer, template.question)
    unit = encode(tokenizer, template.filler)
    for key in passkey_keys(3, 5, seed=7):
        needle = encode(tokenizer, template.needle.format(key=key))
        for length in (150, 151, 200, 333, 1000):
            filler = length - len(prefix) - len(needle) - len(question)
            for depth in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):
                prompt = build_passkey_prompt(tokenizer, template, length, depth, key, bos_id)
                ids, at = prompt.ids, prompt.needle_start
                assert len(ids) == length
                assert at - len(prefix) == math.floor(depth * filler + 0.5)
                assert ids[:at][: len(prefix)] == prefix and ids[-len(question) :] == question
                assert ids[at : at + len(needle)] == needle
                stream = (unit * (filler // len(unit) + 1))[:filler]
                assert ids[len(prefix) : at] + ids[at + len(needle) : -len(question)] == stream
                text = tokenizer.decode(ids, skip_special_tokens=True)
                assert text.count(key) == 2 and template.needle.format(key=key) in text
                assert prompt.filler_tokens == filler and prompt.needle_length == len(needle)
    assert build_passkey_prompt(tokenizer, template, 300, 0.0, "12345", bos_id).needle_start == len(prefix)


def test_a_passkey_prompt_too_short_for_its_fixed_parts_is_refused(tokenizer_and_info):
    tokenizer, info = tokenizer_and_info
    with pytest.raises(ConfigError, match="passkey_lengths: 40 tokens cannot hold"):
        build_passkey_prompt(tokenizer, PasskeyTemplate(), 40, 0.5, "12345", info.bos_id)


def test_keys_are_seeded_and_have_exactly_the_asked_digits():
    keys = passkey_keys(50, 5, seed=3)
    assert keys == passkey_keys(50, 5, seed=3) and keys != passkey_keys(50, 5, seed=4)
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)


@pytest.mark.parametrize(
    ("text", "right"),
    [
        (" 12345", True),
        (" 12345.", True),
        ("12345 is the pass key", True),
        ("\n 12345", True),
        (" 123456", False),
        (" 1234", False),
        (" 1234 5", False),
        (" 54321", False),
        (" x12345", False),
        ("", False),
    ],
)
def test_exact_match_scoring(text, right):
    assert passkey_correct(text, "12345") is right
    assert (answer_digits(text) == "12345") is right


def answering_model(tokenizer, info, question: str, answer: str) -> Transformer:
    """A real Transformer whose greedy continuation after `question` is `answer`, then EOS.

    Attention and MLP outputs are zero, so each position's logits depend on its own token alone; one-hot
    embeddings and output rows then chain question's last token -> the answer's tokens -> EOS.
    """
    chain = [encode(tokenizer, question)[-1], *encode(tokenizer, answer), info.eos_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "each step needs its own token"
    model = small_model(max_seq_len=256)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (source, target) in enumerate(itertools.pairwise(chain)):
            model.embed_tokens.weight[source, slot] = 1.0
            model.lm_head.weight[target, slot] = 10.0
    return model


def test_passkey_grid_scores_greedy_answers_by_exact_match(tokenizer_and_info):
    """The model always answers 12345: right for that key, wrong for the others, in every cell."""
    tokenizer, info = tokenizer_and_info
    template = PasskeyTemplate()
    model = answering_model(tokenizer, info, template.question, " 12345.")
    keys = ["12345", "54321", "12346"]
    grid = passkey_grid(
        model, tokenizer, template, [160, 240], [0.0, 1.0], keys, bos_id=info.bos_id, eos_id=info.eos_id
    )
    assert grid["lengths"] == [160, 240] and grid["depths"] == [0.0, 1.0] and len(grid["cells"]) == 4
    for cell in grid["cells"]:
        assert cell["answers"] == [" 12345."] * 3
        assert (cell["correct"], cell["trials"]) == (1, 3) and cell["accuracy"] == pytest.approx(1 / 3)
    assert grid["accuracy"] == pytest.approx(1 / 3)


# -- copy probe -------------------------------------------------------------------------------------------


def test_copy_sequences_repeat_a_random_sequence_of_ordinary_tokens(tokenizer_and_info):
    tokenizer, info = tokenizer_and_info
    pool = ordinary_token_ids(tokenizer, info.vocab_size)
    special = {info.bos_id, info.eos_id, info.pad_id, info.unk_id}
    assert len(pool) == info.vocab_size - len(special) and not special & set(pool.tolist())
    for d in (2, 16, 33):
        rows = copy_sequences(pool, d, trials=5, seed=1, bos_id=info.bos_id)
        assert rows.shape == (5, 1 + 2 * d) and (rows[:, 0] == info.bos_id).all()
        assert (rows[:, 1 : 1 + d] == rows[:, 1 + d :]).all()
        assert all(len(set(row[1 : 1 + d])) == d for row in rows)  # no repeats inside X
        assert set(rows[:, 1:].ravel().tolist()) <= set(pool.tolist())
        assert (rows == copy_sequences(pool, d, 5, 1, info.bos_id)).all()
        assert not (rows == copy_sequences(pool, d, 5, 2, info.bos_id)).all()
        plain = copy_sequences(pool, d, trials=5, seed=1, bos_id=None)
        assert plain.shape == (5, 2 * d) and (plain[:, :d] == plain[:, d:]).all()


@pytest.mark.parametrize("bos", [True, False])
def test_copy_probe_averages_the_copies_tokens_but_their_first(bos):
    model = small_model()
    pool = np.arange(4, VOCAB)
    bos_id = 0 if bos else None
    head = 1 if bos else 0
    report = copy_probe(model, pool, [2, 8, 20], trials=3, seed=5, bos_id=bos_id, micro_batch_size=2)
    assert report["chance_loss"] == pytest.approx(math.log(len(pool)))
    for entry in report["distances"]:
        d = entry["distance"]
        losses = direct_token_losses(model, copy_sequences(pool, d, 3, 5, bos_id))
        # loss index j is that of token j + 1: first copy tokens head + 1 .. head + d - 1, second likewise
        first = losses[:, head : head + d - 1]
        second = losses[:, head + d : head + 2 * d - 1]
        assert entry["first_copy_loss"] == pytest.approx(float(first.mean()), rel=1e-5)
        assert entry["second_copy_loss"] == pytest.approx(float(second.mean()), rel=1e-5)
        assert entry["tokens"] == 3 * (d - 1)


# -- loss by position ------------------------------------------------------------------------------------


def test_position_buckets_average_the_per_token_losses_exactly():
    model = small_model()
    sequences = np.random.default_rng(0).integers(0, VOCAB, size=(5, 101))
    direct = direct_token_losses(model, sequences)
    for edges in (None, [0, 1, 7, 50, 100]):
        report = position_loss(model, sequences, edges, micro_batch_size=2)
        expected_edges = edges or default_buckets(100)
        assert [(b["start"], b["end"]) for b in report["buckets"]] == list(itertools.pairwise(expected_edges))
        for bucket in report["buckets"]:
            part = direct[:, bucket["start"] : bucket["end"]]
            assert bucket["tokens"] == part.numel()
            assert bucket["loss"] == pytest.approx(float(part.mean()), rel=1e-5)
        assert report["per_position"] == pytest.approx(direct.mean(dim=0).tolist(), rel=1e-5)
        assert report["sequences"] == 5 and report["length"] == 100
    assert default_buckets(100) == [0, 16, 32, 64, 100] and default_buckets(64) == [0, 16, 32, 64]


def test_documents_are_read_whole_from_their_first_token():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, size=n) for n in (10, 40, 41, 100, 5, 64)]
    stores = {
        "a": ArrayDocumentStore.from_documents(docs[:3]),
        "b": ArrayDocumentStore.from_documents(docs[3:]),
    }
    sequences, chosen = document_prefixes(stores, 40, count=10)
    assert chosen == [("a", 2), ("b", 0), ("b", 2)]  # every document of at least 41 tokens
    for row, (name, index) in zip(sequences, chosen, strict=True):
        assert (row == docs[{"a": 0, "b": 3}[name] + index][:41]).all()
    picked, which = document_prefixes(stores, 40, count=2, seed=3)
    assert len(which) == 2 and set(which) <= set(chosen)
    assert (document_prefixes(stores, 40, count=2, seed=3)[0] == picked).all()
    assert document_prefixes(stores, 200, count=4)[0].shape == (0, 201)


def test_lengths_beyond_the_window_fail_naming_max_seq_len(tokenizer_and_info):
    tokenizer, info = tokenizer_and_info
    model = small_model(max_seq_len=64)
    with pytest.raises(ConfigError, match="length: needs 100 positions but the model's max_seq_len is 64"):
        position_loss(model, np.zeros((1, 101), dtype=np.int64))
    with pytest.raises(ConfigError, match="max_seq_len is 64"):
        long_context_report(model, tokenizer, info, {}, LongContextSettings(length=128))
    with pytest.raises(ConfigError, match="copy_distances"):
        copy_probe(model, np.arange(4, VOCAB), [40], trials=1, bos_id=0)


def test_report_runs_every_part_with_defaults_derived_from_the_length(tokenizer_and_info):
    tokenizer, info = tokenizer_and_info
    model = small_model(max_seq_len=192)
    docs = {"a": ArrayDocumentStore.from_documents([np.arange(300) % VOCAB])}
    settings = LongContextSettings(length=128, copy_trials=2, passkey_trials=1, passkey_depths=[0.5])
    report = long_context_report(model, tokenizer, info, docs, settings, micro_batch_size=2)
    assert report["length"] == 128 and report["max_seq_len"] == 192
    assert report["position_loss"]["documents"] == [["a", 0]]
    assert [d["distance"] for d in report["copy_probe"]["distances"]] == [16, 32, 64]
    assert "holds the template" in report["passkey"]["skipped"]  # 128 tokens cannot hold the default one
    assert report == long_context_report(model, tokenizer, info, docs, settings, micro_batch_size=2)
    settings = LongContextSettings(length=128, position_sequences=0, copy_trials=0, passkey_trials=1)
    settings.passkey_intro, settings.passkey_depths = "", [1.0]
    report = long_context_report(model, tokenizer, info, docs, settings)
    needle = settings.passkey_needle.format(key=passkey_keys(1, 5, seed=0)[0])
    fixed = 1 + len(encode(tokenizer, needle)) + len(encode(tokenizer, settings.passkey_question))
    expected = [n for n in (32, 64, 96, 128) if n >= fixed]  # a quarter, half, three quarters, all
    assert report["passkey"]["lengths"] == expected and len(expected) >= 2
    assert set(report) == {"length", "max_seq_len", "bos", "settings", "passkey"}
    assert report["settings"]["passkey_intro"] == "" and report["settings"]["passkey_depths"] == [1.0]


# -- the command ------------------------------------------------------------------------------------------


def test_out_and_long_context_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["runs/x", "long_context=true", "out=report.json"])
    assert exit_info.value.code == 2 and "out:" in capsys.readouterr().err


def test_a_long_context_stage_gets_the_long_context_suite_by_default():
    stage = compose_pretrain_config(["+experiment=demo_long"])
    plain = compose_pretrain_config(["+experiment=debug"])
    assert wants_long_context(EvaluateConfig(run="runs/demo_long"), stage)
    assert not wants_long_context(EvaluateConfig(run="runs/debug"), plain)
    assert not wants_long_context(EvaluateConfig(run="runs/demo_long", long_context=False), stage)
    assert wants_long_context(EvaluateConfig(run="runs/debug", long_context=True), plain)


@pytest.mark.slow
def test_cli_writes_the_long_context_report_and_plots_into_the_run(debug_run, tmp_path, capsys):
    """Small grids on the 64-token debug model; a short template so that passkey prompts fit its window."""
    eval_root = debug_run / "eval"
    assert not eval_root.exists()
    try:
        report = main(
            [
                str(debug_run),
                "long_context=true",
                "position_sequences=4",
                "copy_trials=2",
                "copy_distances=[4,16,32]",
                "passkey_trials=2",
                "passkey_digits=3",
                "passkey_lengths=[24,48]",
                "passkey_depths=[0,1]",
                "passkey_intro=''",
                "passkey_needle=' key {key}.'",
                "passkey_question=' key'",
                "log_level=WARNING",
            ]
        )
        out = eval_root / Path(report["checkpoint"]).name
        saved = json.loads((out / "long_context.json").read_text())
        assert saved == json.loads(json.dumps(report))
        assert saved["length"] == saved["max_seq_len"] == saved["train_seq_len"] == 64
        assert saved["position_loss"]["sequences"] == 4
        assert [b["end"] for b in saved["position_loss"]["buckets"]] == [16, 32, 64]
        assert all(math.isfinite(b["loss"]) for b in saved["position_loss"]["buckets"])
        assert [d["distance"] for d in saved["copy_probe"]["distances"]] == [4, 16, 32]
        assert [(c["length"], c["depth"]) for c in saved["passkey"]["cells"]] == [
            (24, 0.0),
            (24, 1.0),
            (48, 0.0),
            (48, 1.0),
        ]
        for name in ("position_loss.png", "copy_probe.png", "passkey.png"):
            data = (out / name).read_bytes()
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        err = capsys.readouterr().err
        assert "loss by position" in err and "passkey accuracy" in err

        compared = tmp_path / "compare"
        main([str(debug_run), "long_context=true", f"eval_dir={compared}", f"compare=[{out}]",
              "copy_trials=0", "passkey_trials=0", "position_sequences=2", "length=32", "log_level=WARNING"])  # fmt: skip
        assert sorted(p.name for p in compared.iterdir()) == ["long_context.json", "position_loss.png"]

        with pytest.raises(SystemExit) as exit_info:
            main([str(debug_run), "long_context=true", "length=128", f"eval_dir={tmp_path}"])
        assert exit_info.value.code == 2 and "max_seq_len is 64" in capsys.readouterr().err
    finally:
        shutil.rmtree(eval_root, ignore_errors=True)


@pytest.mark.slow
def test_a_model_evaluated_past_its_window_on_held_out_files(debug_run, tmp_path):
    """`max_seq_len` runs the 64-token debug model at 128 tokens; `texts` scores files none of it trained on,
    each one document encoded as the run's were."""
    files = tmp_path / "held_out"
    files.mkdir()
    source = (ROOT / "pretrain" / "model" / "transformer.py").read_text()
    for i in range(3):
        (files / f"doc{i}.py").write_text(source[i * 3000 : i * 3000 + 6000])
    report = main([str(debug_run), "long_context=true", "length=128", "max_seq_len=128",
                   f"texts=['{files}/*.py']", "copy_trials=0", "passkey_trials=0", "position_sequences=8",
                   f"eval_dir={tmp_path / 'eval'}", "log_level=WARNING"])  # fmt: skip
    assert report["max_seq_len"] == report["length"] == 128 and report["train_seq_len"] == 64
    assert report["position_loss"]["sequences"] == 3  # one per file, each read from its BOS
    assert {name for name, _ in report["position_loss"]["documents"]} == {"texts"}
    assert [b["end"] for b in report["position_loss"]["buckets"]][-1] == 128
