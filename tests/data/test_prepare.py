"""data.prepare: counts, BOS and EOS, the train/val split, reuse and resume, and dirty input that never crashes it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import prepare as prepare_module
from data import shard_builder
from data.cli import compose_data_config
from data.manifest import load_split, read_manifest
from data.prepare import ensure_shards, prepare, split_of, why_prepare
from data.shards import SPLITS
from data.tokenizer import load_tokenizer, train_tokenizer
from tests.data.prepare_corpus import prepare_config, random_text, shard_files, write_corpus
from tests.helpers import ROOT


def _split_docs(cfg, split: str, fingerprint: str) -> list[np.ndarray]:
    shards = load_split(cfg.data.shards_dir, "web", split, expected_fingerprint=fingerprint)
    return [shard.doc(i) for shard in shards for i in range(shard.n_docs)]


def test_split_is_stable_and_honours_the_fraction():
    # Literal values: the split must not change between runs, machines or Python versions.
    assert "".join("v" if split_of("web", i, 0.3) == "val" else "t" for i in range(24)) == EXPECTED_SPLIT
    share = sum(split_of("web", i, 0.1) == "val" for i in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
    assert all(split_of("web", i, 0.0) == "train" for i in range(1000))
    assert [split_of("a", i, 0.5) for i in range(64)] != [split_of("b", i, 0.5) for i in range(64)]


EXPECTED_SPLIT = "tvttvvtttvtttvtttttvtttt"


def test_manifest_counts_tokens_bos_and_eos(tmp_path, corpus, tokenizer_dir):
    path, texts = corpus
    cfg = prepare_config(tmp_path, path, tokenizer_dir)
    tokenizer, info = load_tokenizer(tokenizer_dir)
    manifest = prepare(cfg)["web"]
    assert manifest == read_manifest(cfg.data.shards_dir, "web")
    assert manifest["tokenizer_fingerprint"] == info.fingerprint and manifest["dtype"] == "uint16"
    expected = {s: [t for i, t in enumerate(texts) if split_of("web", i, 0.1) == s] for s in SPLITS}
    assert 0 < len(expected["val"]) < len(expected["train"])
    for split in SPLITS:
        docs = _split_docs(cfg, split, info.fingerprint)
        entry = manifest["splits"][split]
        assert entry["docs"] == len(docs) == len(expected[split])
        assert entry["tokens"] == sum(len(d) for d in docs) == sum(s["tokens"] for s in entry["shards"])
        assert [s["docs"] for s in entry["shards"][:-1]] == [40] * (len(entry["shards"]) - 1)
        for doc, text in zip(docs, expected[split], strict=True):
            assert doc[0] == info.bos_id and doc[-1] == info.eos_id
            assert info.bos_id not in doc[1:].tolist() and info.eos_id not in doc[:-1].tolist()
            assert doc[1:-1].tolist() == tokenizer.encode(text, add_special_tokens=False).ids
            assert tokenizer.decode(doc[1:-1].tolist()) == text
    assert manifest["rejects"] == {"total": 0, "by_reason": {}}
    assert (Path(cfg.data.shards_dir) / "web" / "rejects.jsonl").read_text() == ""


def test_rerun_reuses_and_resume_rebuilds_exactly_what_is_missing(tmp_path, corpus, tokenizer_dir):
    path, _ = corpus
    cfg = prepare_config(tmp_path, path, tokenizer_dir)
    first = prepare(cfg)
    before = shard_files(cfg)
    assert len(before) >= 6
    assert prepare(cfg) == first
    assert shard_files(cfg) == before, "a re-run must not rewrite any shard"

    directory = Path(cfg.data.shards_dir) / "web"
    (directory / "train-00002.bin").unlink()
    (directory / ".train-00003.bin.left-by-a-crash.tmp").write_bytes(b"partial")
    (directory / "manifest.json").unlink()
    assert why_prepare(cfg, first["web"]["tokenizer_fingerprint"]) is not None
    assert prepare(cfg) == first
    after = shard_files(cfg)
    assert after.keys() == before.keys()
    assert after["train-00002.bin"][1] == before["train-00002.bin"][1], "rebuilt shard must be identical"
    assert {n for n in before if after[n][0] != before[n][0]} == {"train-00002.bin"}
    assert not [p for p in directory.iterdir() if ".tmp" in p.name]


def test_special_tokens_spelled_in_a_document_are_text(tokenizer_dir):
    """ "</s>" or "<pad>" written in a document must not become the end of a document or padding."""
    from data.tokenize_pool import encode_documents

    tokenizer, info = load_tokenizer(tokenizer_dir)
    text = "close with </s> or pad with <pad>, begin with <s>"
    tokens, lengths = encode_documents(tokenizer, [text], info.eos_id, np.dtype(np.int64), info.bos_id)
    inner = tokens[1:-1].tolist()
    assert (tokens[0], tokens[-1], lengths[0]) == (info.bos_id, info.eos_id, len(tokens))
    assert not {info.bos_id, info.eos_id, info.pad_id} & set(inner)
    assert tokenizer.decode(inner) == text


def test_add_bos_decides_the_shards(tmp_path, corpus, tokenizer_dir):
    """Switching data.add_bos makes the shards stale, and the prepare that follows re-tokenizes every document
    rather than reusing shards encoded the other way (their per-document digests differ)."""
    path, texts = corpus
    _, info = load_tokenizer(tokenizer_dir)
    with_bos = prepare_config(tmp_path, path, tokenizer_dir)
    prepare(with_bos)
    assert why_prepare(with_bos, info.fingerprint) is None
    without = prepare_config(tmp_path, path, tokenizer_dir, "data.add_bos=false")
    assert "another source config" in (why_prepare(without, info.fingerprint) or "")
    prepare(without)
    assert why_prepare(without, info.fingerprint) is None
    assert why_prepare(with_bos, info.fingerprint) is not None
    fresh = prepare_config(tmp_path / "fresh", path, tokenizer_dir, "data.add_bos=false")
    prepare(fresh)
    assert _bytes(without) == _bytes(fresh), "shards with a BOS were reused for documents without one"
    train = [t for i, t in enumerate(texts) if split_of("web", i, 0.1) == "train"]
    docs = _split_docs(without, "train", info.fingerprint)
    assert [d.tolist() for d in docs[:5]] == [
        [*tokenizer_ids, info.eos_id] for tokenizer_ids in _ids(tokenizer_dir, train[:5])
    ]


def _ids(tokenizer_dir, texts: list[str]) -> list[list[int]]:
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def _bytes(cfg) -> dict[str, bytes]:
    return {name: data for name, (_, data) in shard_files(cfg).items()}


def _shard_contents(texts: list[str]) -> dict[str, list[str]]:
    """Which texts each shard file should hold (val_fraction 0.1, docs_per_shard 40)."""
    groups: dict[str, list[str]] = {}
    counts = dict.fromkeys(SPLITS, 0)
    for ordinal, text in enumerate(texts):
        split = split_of("web", ordinal, 0.1)
        groups.setdefault(f"{split}-{counts[split] // 40:05d}.bin", []).append(text)
        counts[split] += 1
    return groups


@pytest.mark.parametrize("edit", ["change", "append", "truncate"])
def test_edited_corpus_rebuilds_only_what_changed(tmp_path, corpus, tokenizer_dir, edit):
    """Each shard keeps a digest per document, so an edit re-tokenizes only from the first changed document."""
    path, texts = corpus
    cfg = prepare_config(tmp_path / "old", path, tokenizer_dir)
    prepare(cfg)
    before = shard_files(cfg)
    old_contents = _shard_contents(texts)
    if edit == "change":
        texts[100] = "a changed document"
    elif edit == "append":
        texts += ["one more document", "and another", "and a third"]
    else:
        texts = texts[:-30]
    write_corpus(path, texts)
    new_contents = _shard_contents(texts)
    expected = {name for name, docs in new_contents.items() if old_contents.get(name) != docs}
    assert 1 <= len(expected) <= 3
    prepare(cfg)
    after = shard_files(cfg)
    assert set(after) == set(new_contents), "shards the corpus no longer fills are removed"
    assert {n for n in after if n not in before or after[n][0] != before[n][0]} == expected
    fresh = prepare_config(tmp_path / "fresh", path, tokenizer_dir)
    prepare(fresh)
    assert _bytes(cfg) == _bytes(fresh), "an incremental re-run must give the bytes of a fresh run"
    assert read_manifest(cfg.data.shards_dir, "web") == read_manifest(fresh.data.shards_dir, "web")


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, corpus, tokenizer_dir, monkeypatch):
    path, _ = corpus
    clean = prepare_config(tmp_path / "clean", path, tokenizer_dir)
    prepare(clean)
    cfg = prepare_config(tmp_path / "interrupted", path, tokenizer_dir)
    real_complete = shard_builder.SourceBuilder._complete_oldest
    calls = []

    def complete_then_crash(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        real_complete(self)

    monkeypatch.setattr(shard_builder.SourceBuilder, "_complete_oldest", complete_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    monkeypatch.undo()
    directory = Path(cfg.data.shards_dir) / "web"
    assert not (directory / "manifest.json").exists()
    assert not [p for p in directory.iterdir() if ".tmp" in p.name], "temporary files must be cleaned up"
    committed = {p.name for p in directory.glob("*.bin")}
    assert 0 < len(committed) < len(shard_files(clean))
    with pytest.raises(Exception, match="no manifest"):
        load_split(cfg.data.shards_dir, "web", "train", expected_fingerprint=None)

    prepare(cfg)
    assert _bytes(cfg) == _bytes(clean)
    assert (
        read_manifest(cfg.data.shards_dir, "web")["splits"]
        == read_manifest(clean.data.shards_dir, "web")["splits"]
    )


def test_ensure_shards(tmp_path, corpus, tokenizer_dir, monkeypatch):
    path, _ = corpus
    cfg = prepare_config(tmp_path, path, tokenizer_dir)
    fingerprint = load_tokenizer(tokenizer_dir)[1].fingerprint
    assert "no manifest" in why_prepare(cfg, fingerprint)
    ensure_shards(cfg)
    assert why_prepare(cfg, fingerprint) is None
    assert "another tokenizer" in why_prepare(cfg, "0" * 64)

    def must_not_run(_cfg):
        raise AssertionError("ensure_shards re-ran prepare on up-to-date shards")

    monkeypatch.setattr(prepare_module, "prepare", must_not_run)
    ensure_shards(cfg)
    changed = prepare_config(tmp_path, path, tokenizer_dir, "data.docs_per_shard=25")
    assert "another source config" in why_prepare(changed, fingerprint)
    # The mixture weight does not change the shards, so it must not force a rebuild.
    assert (
        why_prepare(prepare_config(tmp_path, path, tokenizer_dir, "data.sources.web.weight=3.0"), fingerprint)
        is None
    )
    monkeypatch.undo()
    ensure_shards(changed)
    assert why_prepare(changed, fingerprint) is None
    manifest = read_manifest(changed.data.shards_dir, "web")
    assert manifest["splits"]["train"]["shards"][0]["docs"] == 25


# ----------------------------------------------------------------------------------------------- dirty input

REJECT_KINDS = {
    "empty": lambda rng: [b'{"text": ""}', b""][rng.randrange(2)],
    "whitespace_only": lambda rng: json.dumps({"text": rng.choice([" ", "\n\t ", "\u3000 \r\n"])}).encode(),
    "invalid_utf8": lambda rng: rng.choice(
        [
            b'{"text": "caf\xe9 au lait"}',
            b'{"text": "\xff\xfe' + bytes([rng.randrange(128, 256)]) + b'"}',
            b'{"text": "lone \\ud800 surrogate"}',
        ]
    ),
    "nul_byte": lambda rng: json.dumps({"text": "before\u0000after" * rng.randint(1, 3)}).encode(),
    "broken_json": lambda rng: rng.choice(
        [b'{"text": "unterminated', b"{text: 1}", b"[1, 2", b'"just a string"']
    ),
    "missing_field": lambda rng: rng.choice([b'{"body": "no text field"}', b'{"text": null}', b"{}"]),
    "non_string_field": lambda rng: rng.choice(
        [b'{"text": 17}', b'{"text": ["a", "b"]}', b'{"text": {"x": 1}}']
    ),
    "too_long": lambda rng: json.dumps({"text": "long " * rng.randint(401, 600)}).encode(),
}


def test_fuzzed_corpus_rejects_every_bad_record_and_keeps_valid_tokens(tmp_path, tokenizer_dir):
    rng = random.Random(7)
    valid = [random_text(rng) for _ in range(400)]
    bad = [(kind, make(rng)) for kind, make in REJECT_KINDS.items() for _ in range(125)]
    assert len(bad) == 1000
    lines = [("ok", json.dumps({"text": t}, ensure_ascii=False).encode()) for t in valid] + bad
    rng.shuffle(lines)
    dirty = tmp_path / "dirty" / "web.jsonl"
    dirty.parent.mkdir()
    dirty.write_bytes(b"\n".join(line for _, line in lines) + b"\n")
    ordered_valid = [json.loads(line)["text"] for kind, line in lines if kind == "ok"]
    clean = tmp_path / "clean" / "web.jsonl"
    write_corpus(clean, ordered_valid)

    extra = ("data.val_fraction=0", "data.max_doc_chars=2000")
    dirty_cfg = prepare_config(tmp_path / "d", dirty, tokenizer_dir, *extra)
    clean_cfg = prepare_config(tmp_path / "c", clean, tokenizer_dir, *extra)
    dirty_manifest = prepare(dirty_cfg)["web"]
    prepare(clean_cfg)

    expected_counts = {kind: 125 for kind in REJECT_KINDS}
    assert dirty_manifest["rejects"] == {"total": 1000, "by_reason": expected_counts}
    rejects = [
        json.loads(x)
        for x in (Path(dirty_cfg.data.shards_dir) / "web" / "rejects.jsonl").read_text().splitlines()
    ]
    listed = sorted((int(r["location"].rsplit(":", 1)[1]), r["reason"]) for r in rejects)
    injected = sorted((number, kind) for number, (kind, _) in enumerate(lines, start=1) if kind != "ok")
    assert listed == injected
    assert all(r["source"] == "web" for r in rejects)
    # Same valid documents in the same order, so the same shards byte for byte (the digest covers texts only).
    assert {n: b for n, (_, b) in shard_files(dirty_cfg).items()} == {
        n: b for n, (_, b) in shard_files(clean_cfg).items()
    }
    assert dirty_manifest["splits"]["train"]["docs"] == len(valid)


_VALID_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda t: not t.isspace())
_RECORD = st.one_of(
    _VALID_TEXT.map(lambda t: ("ok", t, json.dumps({"text": t}, ensure_ascii=False).encode())),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b).map(lambda b: ("raw", None, b)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_RECORD, max_size=25))
def test_any_input_is_either_a_document_or_a_reject(tmp_path_factory, tokenizer_dir, records):
    tmp = tmp_path_factory.mktemp("prop")
    corpus = tmp / "web.jsonl"
    corpus.write_bytes(b"".join(line + b"\n" for _, _, line in records))
    cfg = prepare_config(tmp, corpus, tokenizer_dir, "data.docs_per_shard=3", "data.num_workers=1")
    tokenizer, info = load_tokenizer(tokenizer_dir)
    manifest = prepare(cfg)["web"]
    docs = sum(manifest["splits"][s]["docs"] for s in SPLITS)
    assert docs + manifest["rejects"]["total"] == len(records)
    # Every well-formed record is a document, and its tokens decode back to its text.
    expected = {
        s: [t for i, (k, t, _) in enumerate(records) if k == "ok" and split_of("web", i, 0.1) == s]
        for s in SPLITS
    }
    for split in SPLITS:
        got = _split_docs(cfg, split, info.fingerprint)
        valid = [tokenizer.decode(d[1:-1].tolist()) for d in got]
        assert [t for t in valid if t in expected[split]] == expected[split]


# ----------------------------------------------------------------------------------------------- embedded + CLI


def test_embedded_corpus_with_a_tiny_bpe(tmp_path):
    cfg = compose_data_config(
        [
            f"paths.artifacts={tmp_path}",
            "tokenizer.vocab_size=500",
            "tokenizer.byte_budget=200000",
            "data.docs_per_shard=64",
        ]
    )
    info = train_tokenizer(cfg)
    tokenizer, _ = load_tokenizer(info.dir)
    manifests = prepare(cfg)
    assert set(manifests) == {"python_code", "python_docs"}
    from data.sources import iter_documents

    for name, manifest in manifests.items():
        source = cfg.data.sources[name]
        docs = list(iter_documents(source, max_doc_chars=cfg.data.max_doc_chars))
        total = sum(manifest["splits"][s]["docs"] for s in SPLITS)
        assert total == len(docs) > 10
        assert manifest["splits"]["val"]["docs"] == sum(
            split_of(name, d.ordinal, cfg.data.val_fraction) == "val" for d in docs
        )
        for split in SPLITS:
            shards = load_split(cfg.data.shards_dir, name, split, expected_fingerprint=info.fingerprint)
            assert sum(s.n_tokens for s in shards) == manifest["splits"][split]["tokens"]
            for shard in shards:
                ends = shard.doc_offsets[1:] - 1
                assert (shard.tokens[ends] == info.eos_id).all()
                assert (shard.tokens[shard.doc_offsets[:-1]] == info.bos_id).all()
        first = next(d for d in docs if split_of(name, d.ordinal, cfg.data.val_fraction) == "train")
        shard = load_split(cfg.data.shards_dir, name, "train", expected_fingerprint=info.fingerprint)[0]
        assert tokenizer.decode(shard.doc(0)[1:-1].tolist()) == first.text


def test_cli_needs_a_tokenizer_then_prepares(tmp_path, corpus, tokenizer_dir):
    path, _ = corpus
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "data.prepare",
        "data=local_jsonl",
        f"data.sources.web.paths=[{path}]",
        "data.num_workers=2",
        "tokenizer.vocab_size=300",
    ]
    missing = subprocess.run(
        [*args, f"tokenizer.dir={tmp_path / 'none'}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    # An expected error is one line on stderr and status 2, as the trainer gives, not a traceback.
    assert missing.returncode == 2, missing.stderr
    assert "Traceback" not in missing.stderr
    assert missing.stderr.startswith(f"error: no trained tokenizer at {tmp_path / 'none'}")
    assert missing.stderr.count("\n") == 1 and "python -m data.tokenizer" in missing.stderr
    done = subprocess.run(
        [*args, f"tokenizer.dir={tokenizer_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "source web: 250 docs" in done.stderr
    assert list((tmp_path / "artifacts" / "shards" / "local_jsonl").rglob("manifest.json"))


@pytest.mark.parametrize("command", ["data.prepare", "data.tokenizer"])
def test_cli_names_the_kind_to_set_for_a_parquet_file_in_a_jsonl_source(tmp_path, tokenizer_dir, command):
    """A real Parquet file given to the `local_jsonl` preset: one line naming the key, no per-line rejects."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(2)
    parquet = tmp_path / "corpus" / "web.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table({"text": [random_text(rng) for _ in range(300)]}), parquet)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", command, "data=local_jsonl", f"data.sources.web.paths=[{parquet}]"]
    args += [f"tokenizer.dir={tokenizer_dir if command == 'data.prepare' else tmp_path / 'tok'}"]
    result = subprocess.run(
        [*args, "tokenizer.vocab_size=300"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "broken" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"error: data.sources.web.kind: {parquet} is a Parquet file"), lines
    assert "set data.sources.web.kind=parquet" in lines[-1]
    assert all(
        not p.read_text() for p in (tmp_path / "artifacts").rglob("rejects.jsonl")
    )  # no per-line rejects


# ----------------------------------------------------------------------------------------------- job array
