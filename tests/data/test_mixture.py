"""Mixing on real shards: token shares follow the weights, the long pool keeps its share and its documents
contiguous, repetition beyond the cap is refused (or warned about), and the order is reproducible."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from data.config import ConfigError, DataConfig, PackingConfig, SourceConfig
from data.manifest import shard_entry, write_manifest
from data.mixture import LONG_POOL, MixtureDataset
from data.shard_writer import write_shard
from data.shards import ShardError, shard_path

FINGERPRINT = "ab" * 32
VOCAB = 5000
PAD = 0
SEQ_LEN = 64


def write_source(
    shards_dir: Path, name: str, splits: dict[str, list[np.ndarray]], per_shard: int = 64
) -> None:
    """Shards and a manifest for one source, as `data.prepare` lays them out (made-up token ids)."""
    manifest_splits = {}
    for split, docs in splits.items():
        entries = []
        for i, lo in enumerate(range(0, len(docs), per_shard)):
            stats = write_shard(
                shard_path(shards_dir, name, split, i),
                docs[lo : lo + per_shard],
                vocab_size=VOCAB,
                fingerprint=FINGERPRINT,
            )
            entries.append(shard_entry(stats))
        manifest_splits[split] = {
            "docs": len(docs),
            "tokens": int(sum(len(d) for d in docs)),
            "shards": entries,
        }
    write_manifest(
        shards_dir,
        name,
        {
            "source": name,
            "tokenizer_fingerprint": FINGERPRINT,
            "vocab_size": VOCAB,
            "splits": manifest_splits,
        },
    )


def random_docs(rng: np.random.Generator, n: int, low: int, high: int) -> list[np.ndarray]:
    return [rng.integers(1, VOCAB, size=int(k)) for k in rng.integers(low, high, size=n)]


def make_config(
    shards_dir: Path,
    weights: dict[str, float],
    *,
    mode: str = "best_fit",
    long_threshold: int = 0,
    long_share: float = 0.0,
    max_repetition: float = 4.0,
    repetition_policy: str = "error",
    seed: int = 1234,
) -> DataConfig:
    packing = PackingConfig(
        seq_len=SEQ_LEN, mode=mode, long_threshold=long_threshold, long_share=long_share, window_docs=50
    )
    return DataConfig(
        name="t",
        sources={name: SourceConfig(kind="jsonl", paths=["unused"], weight=w) for name, w in weights.items()},
        shards_dir=str(shards_dir),
        packing=packing,
        max_repetition=max_repetition,
        repetition_policy=repetition_policy,
        seed=seed,
    )


def build(config: DataConfig, split: str = "train", planned: int | None = None) -> MixtureDataset:
    return MixtureDataset(
        config, pad_id=PAD, tokenizer_fingerprint=FINGERPRINT, split=split, planned_samples=planned
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sources of unequal size; some documents are long (>= 150 tokens) and some exceed the capacity."""
    shards_dir = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    sizes = {"web": (900, 5, 120), "code": (400, 20, 200), "books": (150, 50, 400)}
    for name, (n, low, high) in sizes.items():
        docs = random_docs(rng, n, low, high)
        write_source(shards_dir, name, {"train": docs, "val": random_docs(rng, 12, low, high)})
    return shards_dir


def real_tokens_by_source(dataset: MixtureDataset, n: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for g in range(n):
        real = int((dataset[g]["document_ids"] >= 0).sum())
        name = dataset.source_name(g)
        totals[name] = totals.get(name, 0) + real
    return totals


def test_token_shares_follow_weights(corpus: Path) -> None:
    weights = {"web": 0.5, "code": 0.3, "books": 0.2}
    dataset = build(make_config(corpus, weights, max_repetition=100.0), planned=10_000)
    assert len(dataset) == 10_000
    totals = real_tokens_by_source(dataset, 10_000)
    everything = sum(totals.values())
    # Weights are token shares, and they sum to 1 here, so each source's share of real tokens is its weight.
    # Observed error 0.00021 (partial epochs); without the padding correction (every pool's fill taken as 1) the
    # shares move by up to 0.0033, since the pools' fills differ (0.966, 0.973, 0.987).
    for name, weight in weights.items():
        assert abs(totals[name] / everything - weight) < 5e-4, (name, totals[name] / everything)


def test_long_pool_share_and_contiguity(corpus: Path) -> None:
    config = make_config(
        corpus,
        {"web": 0.5, "code": 0.3, "books": 0.2},
        long_threshold=150,
        long_share=0.25,
        max_repetition=100.0,
    )
    dataset = build(config, planned=10_000)
    names = [dataset.source_name(g) for g in range(10_000)]
    assert abs(names.count(LONG_POOL) / 10_000 - 0.25) <= 0.02
    lengths = {name: dataset.source_doc_lengths(name) for name in config.sources}
    current: tuple[str, int] | None = None
    expected_start = 0
    completed = 0
    for g, name in enumerate(names):
        segments = dataset.describe_sample(g)
        if name != LONG_POOL:
            # Short pools hold no long document.
            assert all(lengths[src][doc] < 150 for src, doc, _, _ in segments)
            continue
        for src, doc, start, length in segments:
            assert lengths[src][doc] >= 150
            if (src, doc) == current:
                assert start == expected_start - 1, "a long document continues on the token where it stopped"
            else:
                assert current is None or expected_start == lengths[current[0]][current[1]], (
                    "previous doc finished"
                )
                assert start == 0, "a long document is read from its start"
                current = (src, doc)
                completed += 1
            expected_start = start + length
    assert completed > 20


def test_every_sequence_once_per_epoch(corpus: Path) -> None:
    dataset = build(make_config(corpus, {"books": 1.0}), planned=None)
    n_seq = dataset.pools[0].n_seq
    first = [tuple(s) for g in range(n_seq) for s in dataset.describe_sample(g)]
    second = [tuple(s) for g in range(n_seq, 2 * n_seq) for s in dataset.describe_sample(g)]
    assert len(set(first)) == len(first)
    assert set(first) == set(second)
    assert first != second, "each epoch has its own order"
    # Every token of a document but its first is a target once: a segment of n tokens holds n - 1 targets.
    targets = sum(length - 1 for _, _, _, length in first)
    assert targets == int((dataset.source_doc_lengths("books") - 1).sum())


def test_repetition_cap_errors_naming_the_source(corpus: Path) -> None:
    config = make_config(corpus, {"web": 0.2, "books": 0.8}, max_repetition=2.0)
    with pytest.raises(ConfigError, match=r"data\.sources\.books .*epochs.*max_repetition=2\.0"):
        build(config, planned=5_000)


def test_repetition_cap_warns_under_policy_warn(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(corpus, {"web": 0.2, "books": 0.8}, max_repetition=2.0, repetition_policy="warn")
    logger = logging.getLogger("llm")
    logger.addHandler(caplog.handler)
    try:
        dataset = build(config, planned=5_000)
    finally:
        logger.removeHandler(caplog.handler)
    assert len(dataset) == 5_000
    assert any(
        "data.sources.books" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


def test_long_share_repetition_names_long_share(corpus: Path) -> None:
    config = make_config(corpus, {"web": 1.0}, long_threshold=390, long_share=0.5, max_repetition=1.5)
    with pytest.raises(ConfigError, match=r"long_share"):
        build(config, planned=5_000)


def test_same_config_same_samples_and_fingerprint(corpus: Path) -> None:
    weights = {"web": 0.5, "code": 0.3, "books": 0.2}
    a = build(
        make_config(corpus, weights, long_threshold=150, long_share=0.1, max_repetition=100.0), planned=100
    )
    b = build(
        make_config(corpus, weights, long_threshold=150, long_share=0.1, max_repetition=100.0), planned=100
    )
    for g in (0, 1, 77, 5_003, 123_456):
        for key in ("tokens", "position_ids", "document_ids"):
            assert np.array_equal(a[g][key], b[g][key])
    assert a.fingerprint() == b.fingerprint()
    other_seed = make_config(
        corpus, weights, long_threshold=150, long_share=0.1, max_repetition=100.0, seed=7
    )
    assert build(other_seed, planned=100).fingerprint() != a.fingerprint()
    other_weights = make_config(corpus, {"web": 0.4, "code": 0.4, "books": 0.2}, max_repetition=100.0)
    assert build(other_weights, planned=100).fingerprint() != a.fingerprint()


def test_sample_format(corpus: Path) -> None:
    dataset = build(make_config(corpus, {"web": 1.0, "code": 1.0}, mode="concat"), planned=50)
    sample = dataset[3]
    assert set(sample) == {"tokens", "position_ids", "document_ids"}
    assert sample["tokens"].shape == (SEQ_LEN + 1,) and sample["tokens"].dtype == np.int64
    assert sample["document_ids"].dtype == np.int32


def test_val_split_reads_every_sequence_once_and_per_source(corpus: Path) -> None:
    config = make_config(corpus, {"web": 0.5, "code": 0.3, "books": 0.2}, long_threshold=150, long_share=0.2)
    val = build(config, split="val")
    segments = [s for g in range(len(val)) for s in val.describe_sample(g)]
    val_targets = sum(int((val.source_doc_lengths(name) - 1).sum()) for name in config.sources)
    assert sum(length - 1 for *_, length in segments) == val_targets
    assert len(set(segments)) == len(segments)
    with pytest.raises(IndexError):
        val[len(val)]
    books = val.for_source("books")
    assert {src for g in range(len(books)) for src, *_ in books.describe_sample(g)} == {"books"}
    assert sum(length - 1 for g in range(len(books)) for *_, length in books.describe_sample(g)) == int(
        (val.source_doc_lengths("books") - 1).sum()
    )


def test_missing_shards_give_a_clear_error(tmp_path: Path, corpus: Path) -> None:
    config = make_config(tmp_path, {"web": 1.0})
    with pytest.raises(ShardError, match=r"data\.prepare"):
        build(config)
    with pytest.raises(ShardError, match="tokenizer"):
        MixtureDataset(
            make_config(corpus, {"web": 1.0}), pad_id=PAD, tokenizer_fingerprint="cd" * 32, planned_samples=10
        )


def test_source_without_short_documents_is_a_clear_error(corpus: Path) -> None:
    config = make_config(corpus, {"web": 0.5, "books": 0.5}, long_threshold=50, long_share=0.2)
    with pytest.raises(ConfigError, match=r"data\.sources\.books: no train documents below"):
        build(config, planned=100)
