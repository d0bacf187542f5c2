"""Tokenizer training: lossless byte-level BPE, specials at the lowest ids, a directory transformers loads,
weighted budgeted sampling, reuse by `ensure_tokenizer`, atomic replacement."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.cli import compose_data_config
from data.config import ConfigError, DataPipelineConfig
from data.tokenizer import TokenizerError, ensure_tokenizer, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["tokenizer.vocab_size=600", "tokenizer.byte_budget=300000"]
EXPECTED_SPECIALS = {
    "bpe": ["<s>", "</s>", "<pad>", "<unk>"],
    "unigram": ["<s>", "</s>", "<pad>", "<unk>"],
    "wordpiece": ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"],
}
SAMPLE = "Hello wörld! def f(x):\n    return x ** 2  # naïve café 日本語 <s> [MASK]\n\tend."


def compose(artifacts: Path, *overrides: str, sources: dict[str, tuple[Path, float]] | None = None):
    """The data-pipeline config with artifacts under `artifacts`; `sources` replaces the embedded corpus."""
    args = [f"paths.artifacts={artifacts}", *overrides]
    if sources:
        entries = ",".join(f"{n}:{{kind:jsonl,paths:['{p}'],weight:{w}}}" for n, (p, w) in sources.items())
        args += ["data.name=custom", "~data.sources.python_code", "~data.sources.python_docs"]
        args.append(f"+data.sources={{{entries}}}")
    return compose_data_config(args)


@pytest.fixture(scope="module")
def by_kind(tmp_path_factory) -> dict:
    """(config, tokenizer, info) of each kind, trained once on 300 kB of the embedded corpus."""
    out = {}
    for kind in EXPECTED_SPECIALS:
        cfg = compose(tmp_path_factory.mktemp(kind), f"tokenizer={kind}", *SMALL)
        tokenizer, info = load_tokenizer(train_tokenizer(cfg).dir)
        out[kind] = (cfg, tokenizer, info)
    return out


@pytest.fixture(params=list(EXPECTED_SPECIALS))
def trained(request, by_kind):
    return by_kind[request.param]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    cfg = compose(tmp_path_factory.mktemp("bpe_rt"), "tokenizer=bpe", *SMALL)
    return load_tokenizer(train_tokenizer(cfg).dir)[0]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_byte_level_bpe_round_trips_any_unicode(bpe, text: str) -> None:
    ids = bpe.encode(text).ids
    assert bpe.decode(ids, skip_special_tokens=False) == text


def test_byte_level_bpe_round_trips_awkward_text(bpe) -> None:
    for text in [
        "",
        " ",
        "  leading",
        "trailing  \n",
        "\r\n\t\x00\x7f",
        "e\u0301 \u200b \U0001f600",
        "<s></s>",
    ]:
        assert bpe.decode(bpe.encode(text).ids, skip_special_tokens=False) == text
    assert bpe.token_to_id("<unk>") not in bpe.encode("\U0010ffff 日本").ids  # bytes, never unknown


def test_specials_take_the_lowest_ids_and_the_vocab_fits(trained) -> None:
    cfg, tokenizer, info = trained
    specials = EXPECTED_SPECIALS[cfg.tokenizer.kind]
    assert [tokenizer.token_to_id(t) for t in specials] == list(range(len(specials)))
    assert (info.bos_id, info.eos_id, info.pad_id, info.unk_id) == (0, 1, 2, 3)
    assert len(specials) < info.vocab_size <= cfg.tokenizer.vocab_size
    assert info.vocab_size == tokenizer.get_vocab_size()
    assert info.kind == cfg.tokenizer.kind
    ids = tokenizer.encode("plain text").ids
    assert ids and not set(ids) & set(range(len(specials)))  # encoding adds no special tokens


def test_wordpiece_lowercases_and_marks_unknowns(by_kind) -> None:
    _, tokenizer, info = by_kind["wordpiece"]
    assert tokenizer.encode("Return The VALUE").ids == tokenizer.encode("return the value").ids
    assert any(t.startswith("##") for t in tokenizer.get_vocab())
    assert info.unk_id in tokenizer.encode("\U0001f600").ids
    assert tokenizer.encode("[MASK]").ids == [4]


def test_unigram_normalizes_nfkc_and_decodes_words(by_kind) -> None:
    _, tokenizer, info = by_kind["unigram"]
    assert tokenizer.encode("ﬁle").ids == tokenizer.encode("file").ids
    assert tokenizer.decode(tokenizer.encode("return the value").ids) == "return the value"
    assert info.unk_id in tokenizer.encode("\U0001f600").ids


def test_transformers_loads_the_directory_and_agrees(trained) -> None:
    transformers = pytest.importorskip("transformers")
    cfg, tokenizer, info = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(info.dir))
    for text in [SAMPLE, "", "x", "  spaced  out  "]:
        assert hf(text)["input_ids"] == tokenizer.encode(text).ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.model_max_length == cfg.tokenizer.model_max_length
    assert len(hf) == info.vocab_size
    ids = tokenizer.encode(SAMPLE).ids
    assert hf.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)


def test_meta_records_fingerprint_config_and_sources(trained) -> None:
    cfg, _, info = trained
    files = sorted(p.name for p in info.dir.iterdir())
    assert files == sorted(
        ["meta.json", "rejects.jsonl", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    )
    meta = json.loads((info.dir / "meta.json").read_text())
    assert (
        meta["fingerprint"]
        == info.fingerprint
        == hashlib.sha256((info.dir / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert len(info.fingerprint) == 64
    assert meta["vocab_size"] == info.vocab_size
    assert meta["config"]["vocab_size"] == cfg.tokenizer.vocab_size
    assert meta["data"]["name"] == "embedded"
    assert set(meta["data"]["sources"]) == {"python_code", "python_docs"}
    assert sum(meta["bytes_seen"].values()) == cfg.tokenizer.byte_budget == 300_000
    assert meta["bytes_seen"]["python_code"] == int(300_000 * 0.85)
    assert {"tokenizers", "datasets", "python"} <= set(meta["versions"])
    assert meta["rejects"]["total"] == 0
    config = json.loads((info.dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == cfg.tokenizer.bos_token


def _write_jsonl(path: Path, texts: list[str], bad_at: int | None = None) -> int:
    lines = [json.dumps({"text": t}) for t in texts]
    if bad_at is not None:
        lines.insert(bad_at - 1, '{"text": broken')
    path.write_text("\n".join(lines) + "\n")
    return sum(len(t.encode()) for t in texts)


def test_budget_is_shared_by_weight_and_sources_are_read_only_as_far_as_needed(tmp_path: Path) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    texts = [" ".join(words[(i + j) % 8] for j in range(15)) + f" {i}" for i in range(3000)]
    _write_jsonl(tmp_path / "a.jsonl", texts, bad_at=3001)  # a broken last line, never reached
    _write_jsonl(tmp_path / "b.jsonl", texts, bad_at=2)
    small_bytes = _write_jsonl(tmp_path / "c.jsonl", texts[:5])
    cfg = compose(
        tmp_path / "art",
        "tokenizer.vocab_size=400",
        "tokenizer.byte_budget=60000",
        sources={
            "a": (tmp_path / "a.jsonl", 3.0),
            "b": (tmp_path / "b.jsonl", 1.0),
            "c": (tmp_path / "c.jsonl", 1.0),
        },
    )
    info = train_tokenizer(cfg)
    meta = json.loads((info.dir / "meta.json").read_text())
    assert meta["bytes_seen"] == {"a": 36000, "b": 12000, "c": small_bytes}
    assert meta["sources_exhausted"] == ["c"]
    assert meta["rejects"] == {"total": 1, "by_reason": {"broken_json": 1}}
    rejects = [json.loads(line) for line in (info.dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["location"].rsplit("/", 1)[-1], r["reason"]) for r in rejects] == [
        ("b", "b.jsonl:2", "broken_json")
    ]


def test_ensure_tokenizer_reuses_a_matching_directory(tmp_path: Path, monkeypatch, caplog) -> None:
    same_dir = [*SMALL, "tokenizer.name=tok"]
    first = ensure_tokenizer(compose(tmp_path, *same_dir))
    import data.tokenizer as module

    def no_training(_cfg: DataPipelineConfig):
        raise AssertionError("should have reused the tokenizer")

    monkeypatch.setattr(module, "train_tokenizer", no_training)
    assert ensure_tokenizer(compose(tmp_path, *same_dir)) == first
    monkeypatch.undo()

    logging.getLogger("llm").addHandler(caplog.handler)
    try:
        changed = ensure_tokenizer(compose(tmp_path, *same_dir, "tokenizer.vocab_size=700"))
        assert "vocab_size is 700 in the config but 600" in caplog.text
        assert changed.vocab_size == 700 and changed.dir == first.dir
        ensure_tokenizer(compose(tmp_path, *same_dir, "tokenizer.vocab_size=700", "data.name=other"))
        assert "trained on data 'embedded', the config asks for 'other'" in caplog.text
    finally:
        logging.getLogger("llm").removeHandler(caplog.handler)


def test_load_tokenizer_errors_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(
        TokenizerError, match=r"no trained tokenizer at .*nothing_here.*python -m data\.tokenizer"
    ):
        load_tokenizer(tmp_path / "nothing_here")
    info = train_tokenizer(compose(tmp_path, *SMALL))
    path = info.dir / "tokenizer.json"
    path.write_text(path.read_text().replace('"<pad>"', '"<PAD>"'))
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_tokenizer(info.dir)
    (info.dir / "meta.json").unlink()
    with pytest.raises(TokenizerError, match=r"meta\.json is missing"):
        load_tokenizer(info.dir)


def test_retraining_replaces_the_directory_atomically(tmp_path: Path) -> None:
    cfg = compose(tmp_path, *SMALL, "tokenizer.name=tok")
    old = train_tokenizer(cfg)
    train_tokenizer(
        compose(tmp_path, "tokenizer.vocab_size=700", "tokenizer.byte_budget=300000", "tokenizer.name=tok")
    )
    assert load_tokenizer(old.dir)[1].vocab_size == 700
    assert os.listdir(old.dir.parent) == ["tok"]  # no temporary or old directories left behind

    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n\n')
    failing = compose(tmp_path, *SMALL, "tokenizer.name=tok", sources={"bad": (tmp_path / "bad.jsonl", 1.0)})
    with pytest.raises(TokenizerError, match="no valid text"):
        train_tokenizer(failing)
    assert load_tokenizer(old.dir)[1].vocab_size == 700  # the old directory survives a failed training
    assert os.listdir(old.dir.parent) == ["tok"]


def test_byte_level_bpe_vocab_must_hold_every_byte(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size"):
        train_tokenizer(compose(tmp_path, "tokenizer.vocab_size=200"))


def test_cli_trains_a_wordpiece_tokenizer(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "data.tokenizer",
        "tokenizer=wordpiece",
        *SMALL,
        f"paths.artifacts={tmp_path}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, info = load_tokenizer(tmp_path / "tokenizers" / "wordpiece-600-embedded")
    assert info.kind == "wordpiece" and info.vocab_size <= 600
    assert "tokenizer written to" in result.stderr
