"""The long-context data mix: short training documents dropped per source at a fixed rate (the same documents on
every build, rank and world size), the source shares kept, the long pool filling whole sequences, and the length
distribution the mixture reports, checked to the exact number on a constructed corpus."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.config import ConfigError, DataConfig, PackingConfig, SourceConfig
from data.length_mix import keep_draws, kept_documents, length_thresholds, pack_long_aligned
from data.loader import GlobalBatchLoader, collate
from data.mixture import LONG_POOL, MIXTURE_BLOCK, MixtureDataset
from data.packing import ArrayDocumentStore, pack_concat
from tests.data.test_labels import epoch_targets, unique_documents

PAD = 0
SEQ_LEN = 64


def random_store(rng: np.random.Generator, n: int, low: int, high: int) -> ArrayDocumentStore:
    return ArrayDocumentStore.from_documents(
        [rng.integers(1, 5000, size=int(k)) for k in rng.integers(low, high, n)]
    )


def corpus(seed: int = 0) -> dict[str, ArrayDocumentStore]:
    """Three sources of unequal size and length; many documents are short (< 100 tokens), some long."""
    rng = np.random.default_rng(seed)
    sizes = {"web": (1500, 5, 160), "code": (600, 20, 240), "books": (250, 50, 400)}
    return {name: random_store(rng, n, low, high) for name, (n, low, high) in sizes.items()}


def make_config(
    weights: dict[str, float],
    *,
    threshold: int = 100,
    keep: float = 0.3,
    long_threshold: int = 0,
    long_share: float = 0.0,
    seed: int = 1234,
    max_repetition: float = 100.0,
    seq_len: int = SEQ_LEN,
) -> DataConfig:
    return DataConfig(
        name="length_mix",
        sources={name: SourceConfig(kind="jsonl", paths=["unused"], weight=w) for name, w in weights.items()},
        packing=PackingConfig(
            seq_len=seq_len,
            long_threshold=long_threshold,
            long_share=long_share,
            short_doc_threshold=threshold,
            short_doc_keep=keep,
            window_docs=50,
        ),
        max_repetition=max_repetition,
        seed=seed,
    )


def build(
    config: DataConfig,
    stores: dict[str, ArrayDocumentStore],
    split: str = "train",
    planned: int | None = None,
) -> MixtureDataset:
    return MixtureDataset(
        config, pad_id=PAD, tokenizer_fingerprint=None, split=split, planned_samples=planned, stores=stores
    )


WEIGHTS = {"web": 0.5, "code": 0.3, "books": 0.2}


@pytest.fixture(scope="module")
def stores() -> dict[str, ArrayDocumentStore]:
    return corpus()


# --------------------------------------------------------------------------------------- the keep decision


def test_short_documents_kept_at_the_rate_and_long_ones_always() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 300, size=40_000)
    for keep in (0.1, 0.5):
        kept = kept_documents(lengths, threshold=100, keep=keep, seed=1234, source="web")
        assert kept[lengths >= 100].all()
        short = lengths < 100
        rate, n = kept[short].mean(), int(short.sum())
        assert abs(rate - keep) < 4 * np.sqrt(keep * (1 - keep) / n), (keep, rate)
    # Off: every document.
    assert kept_documents(lengths, threshold=0, keep=0.1, seed=1, source="web").all()
    assert kept_documents(lengths, threshold=100, keep=1.0, seed=1, source="web").all()


def test_decision_is_a_function_of_seed_source_and_index() -> None:
    draws = keep_draws(5_000, seed=1234, source="web")
    # A document's draw does not depend on how many documents the source has (appending keeps earlier ones).
    assert np.array_equal(keep_draws(100, seed=1234, source="web"), draws[:100])
    assert not np.array_equal(keep_draws(100, seed=1235, source="web"), draws[:100])
    assert not np.array_equal(keep_draws(100, seed=1234, source="code"), draws[:100])
    # Uniform enough: the deciles hold a tenth each.
    counts = np.bincount((draws * 10).astype(int), minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    # Nested: what a lower probability keeps, a higher one keeps too.
    lengths = np.full(5_000, 10)
    low = kept_documents(lengths, threshold=100, keep=0.2, seed=1234, source="web")
    high = kept_documents(lengths, threshold=100, keep=0.4, seed=1234, source="web")
    assert (high | ~low).all()


def test_pinned_decisions() -> None:
    # The decision enters resumed runs' sample order: it must not change across code versions.
    assert keep_draws(4, seed=1234, source="a").round(3).tolist() == [0.446, 0.605, 0.017, 0.287]
    assert keep_draws(4, seed=1234, source="b").round(3).tolist() == [0.428, 0.561, 0.896, 0.823]


def test_pools_hold_exactly_the_kept_documents(stores: dict[str, ArrayDocumentStore]) -> None:
    dataset = build(make_config({"web": 1.0}), stores)
    n_seq = dataset.pools[0].n_seq
    seen = {doc for g in range(n_seq) for _, doc, _, _ in dataset.describe_sample(g)}
    kept = dataset.source_kept("web")
    assert seen == set(np.flatnonzero(kept).tolist())
    lengths = dataset.source_doc_lengths("web")
    assert kept[lengths >= 100].all() and not kept.all()
    # Each kept document's targets are trained once per epoch.
    targets = sum(length - 1 for g in range(n_seq) for *_, length in dataset.describe_sample(g))
    assert targets == int((lengths[kept] - 1).sum())


def test_same_documents_across_builds_and_world_sizes(stores: dict[str, ArrayDocumentStore]) -> None:
    config = make_config(WEIGHTS, long_threshold=150, long_share=0.2)
    first = build(config, stores, planned=400)
    restarted = build(make_config(WEIGHTS, long_threshold=150, long_share=0.2), corpus(), planned=400)
    assert first.fingerprint() == restarted.fingerprint()
    for name in WEIGHTS:
        assert np.array_equal(first.source_kept(name), restarted.source_kept(name))
    for g in (0, 1, 99, 3_777, 123_456):
        assert np.array_equal(first[g]["tokens"], restarted[g]["tokens"])
    # The loader reads by global index: any world size makes the same global batches.
    reference = collate([first[i] for i in range(24)])
    for world_size in (1, 2, 3):
        loaders = [GlobalBatchLoader(restarted, rank=r, world_size=world_size) for r in range(world_size)]
        batches = [loader.next_batch(24) for loader in loaders]
        for key, value in reference.items():
            assert np.array_equal(np.concatenate([b[key].numpy() for b in batches]), value.numpy()), key


# --------------------------------------------------------------------------------------- the mix


def test_token_shares_follow_weights_with_upsampling(stores: dict[str, ArrayDocumentStore]) -> None:
    dataset = build(make_config(WEIGHTS, threshold=100, keep=0.2), stores, planned=10_000)
    totals: dict[str, int] = {}
    for g in range(10_000):
        name = dataset.source_name(g)
        totals[name] = totals.get(name, 0) + int((dataset[g]["document_ids"] >= 0).sum())
    everything = sum(totals.values())
    # Each source's share of real tokens is its weight (they sum to 1). Observed error 0.0001; without the
    # padding correction (every pool's fill taken as 1) the shares move by up to 0.0008 (fills 0.983-0.988).
    for name, weight in WEIGHTS.items():
        assert abs(totals[name] / everything - weight) < 3e-4, (name, totals[name] / everything)
    # And the up-sampling shows: the trained documents are longer than the source's.
    for name in WEIGHTS:
        lengths, kept = dataset.source_doc_lengths(name), dataset.source_kept(name)
        assert lengths[kept].mean() > lengths.mean()


def test_validation_split_is_not_upsampled(stores: dict[str, ArrayDocumentStore]) -> None:
    val = build(make_config(WEIGHTS, keep=0.2), stores, split="val")
    natural = build(make_config(WEIGHTS, threshold=0, keep=1.0), stores, split="val")
    assert not val.upsampling and all(val.source_kept(name).all() for name in WEIGHTS)
    assert len(val) == len(natural) and val.fingerprint() == natural.fingerprint()
    for g in range(0, len(val), 37):
        assert np.array_equal(val[g]["tokens"], natural[g]["tokens"])


def test_fingerprint_follows_the_keys(stores: dict[str, ArrayDocumentStore]) -> None:
    def fingerprint(threshold: int, keep: float) -> str:
        return build(make_config(WEIGHTS, threshold=threshold, keep=keep), stores).fingerprint()

    on = {fingerprint(100, 0.3), fingerprint(100, 0.5), fingerprint(120, 0.3)}
    assert len(on) == 3
    off = fingerprint(0, 1.0)
    assert off not in on
    # Keys that drop nothing leave the order, and so the fingerprint, as it was.
    assert fingerprint(100, 1.0) == off


def test_source_with_no_document_kept_names_the_keys() -> None:
    stores = {"web": corpus()["web"], "tiny": ArrayDocumentStore.from_documents([np.arange(1, 11)] * 8)}
    # tiny's 8 documents of 10 tokens: their draws (seed 1234) are all above 0.15.
    assert (keep_draws(8, seed=1234, source="tiny") > 0.15).all()
    with pytest.raises(
        ConfigError, match=r"data\.sources\.tiny: .*short_doc_threshold=100.*short_doc_keep=0\.15"
    ):
        build(make_config({"web": 0.5, "tiny": 0.5}, keep=0.15), stores, planned=10)


def test_repetition_is_checked_on_the_upsampled_pools(stores: dict[str, ArrayDocumentStore]) -> None:
    natural = make_config(WEIGHTS, threshold=0, keep=1.0, max_repetition=4.0)
    upsampled = make_config(WEIGHTS, threshold=200, keep=0.05, max_repetition=4.0)
    planned = 2_000
    build(natural, stores, planned=planned)
    with pytest.raises(
        ConfigError, match=r"data\.sources\.web .*after dropping short documents.*short_doc_keep"
    ):
        build(upsampled, stores, planned=planned)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"data\.packing\.short_doc_keep"):
        make_config(WEIGHTS, keep=0.0).validate()
    with pytest.raises(ConfigError, match=r"data\.packing\.short_doc_keep"):
        make_config(WEIGHTS, keep=1.5).validate()
    with pytest.raises(ConfigError, match=r"needs data\.packing\.short_doc_threshold > 0"):
        make_config(WEIGHTS, threshold=0, keep=0.5).validate()
    config = make_config(WEIGHTS)
    config.packing.short_doc_threshold = 4e3
    config.validate()
    assert config.packing.short_doc_threshold == 4000


# --------------------------------------------------------------------------------------- the long pool


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 120), max_size=30),
    capacity=st.integers(2, 33),
    seed=st.integers(0, 9),
)
def test_long_pool_documents_fill_whole_sequences(lengths: list[int], capacity: int, seed: int) -> None:
    index = pack_long_aligned(np.asarray(lengths, dtype=np.int64), capacity, seed=seed)
    stride = capacity - 1
    where: dict[int, list[int]] = {}
    for k in range(index.n_sequences):
        docs, starts, lens = index.segments(k)
        assert 0 < int(lens.sum()) <= capacity and (lens > 0).all()
        for doc in docs:
            where.setdefault(int(doc), []).append(k)
    for doc, n in enumerate(lengths):
        if n < max(stride, 2):
            continue
        seqs = where[doc]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
            "a long document's sequences are consecutive"
        )
        n_whole = (n - 1) // stride
        for j, k in enumerate(seqs):
            docs, starts, lens = index.segments(k)
            assert docs[0] == doc and starts[0] == j * stride, "it starts each of its sequences"
            if j < n_whole:
                assert len(docs) == 1 and lens[0] == capacity, "nothing else shares its whole sequences"
    # Documents that fill no sequence are laid out as concat packing lays them out.
    short = np.asarray([min(n, max(stride, 2) - 1) for n in lengths], dtype=np.int64)
    aligned, concat = pack_long_aligned(short, capacity, seed=seed), pack_concat(short, capacity, seed=seed)
    for field in ("seq_offsets", "seg_doc", "seg_start", "seg_len"):
        assert np.array_equal(getattr(aligned, field), getattr(concat, field)), field


def test_long_pool_in_the_mixture_starts_long_documents_on_a_sequence(
    stores: dict[str, ArrayDocumentStore],
) -> None:
    dataset = build(make_config(WEIGHTS, long_threshold=150, long_share=0.3), stores, planned=3_000)
    lengths = {name: dataset.source_doc_lengths(name) for name in WEIGHTS}
    whole = 0
    for g in range(3_000):
        if dataset.source_name(g) != LONG_POOL:
            continue
        segments = dataset.describe_sample(g)
        for position, (src, doc, start, length) in enumerate(segments):
            n = int(lengths[src][doc])
            assert dataset.source_kept(src)[doc] and n >= 150
            if start == 0 and n >= SEQ_LEN:
                assert position == 0, "a document of a sequence or more starts its sequence"
            if start + SEQ_LEN + 1 <= n:
                assert len(segments) == 1 and length == SEQ_LEN + 1
                whole += 1
    assert whole > 500


# --------------------------------------------------------------------------------------- the distribution


def test_length_distribution_is_exact_on_a_constructed_corpus(caplog: pytest.LogCaptureFixture) -> None:
    # seed 1234 draws: a [0.446, 0.605, 0.017, 0.287, 0.992, 0.885], b [0.428, 0.561, 0.896, 0.823] (pinned
    # above); with keep 0.5 and threshold 1024, a keeps 100, 1100, 5000 and b keeps 2000.
    a = [100, 300, 1100, 5000, 200, 50]
    b = [2000, 400, 600, 20]
    docs, _ = unique_documents(a + b)
    stores = {
        "a": ArrayDocumentStore.from_documents(docs[: len(a)]),
        "b": ArrayDocumentStore.from_documents(docs[len(a) :]),
    }
    config = make_config({"a": 3.0, "b": 1.0}, threshold=1024, keep=0.5)
    logger = logging.getLogger("llm")
    logger.addHandler(caplog.handler)
    try:
        dataset = build(config, stores)
    finally:
        logger.removeHandler(caplog.handler)
    assert dataset.source_kept("a").tolist() == [True, False, True, True, False, False]
    assert dataset.source_kept("b").tolist() == [True, False, False, False]

    got = dataset.length_distribution([256, 1024, 4096])
    assert json.loads(json.dumps(got))["sources"]["a"]["before"]["tokens"] == 6750  # plain data, for the logs
    assert got["thresholds"] == [256, 1024, 4096]
    assert got["upsampling"] == {"short_doc_threshold": 1024, "short_doc_keep": 0.5}
    source_a, source_b = got["sources"]["a"], got["sources"]["b"]
    assert (source_a["weight"], source_b["weight"]) == (0.75, 0.25)
    assert source_a["before"] == {
        "docs": 6,
        "tokens": 6750,
        "at_least": {256: 6400 / 6750, 1024: 6100 / 6750, 4096: 5000 / 6750},
    }
    assert source_a["after"] == {
        "docs": 3,
        "tokens": 6200,
        "at_least": {256: 6100 / 6200, 1024: 6100 / 6200, 4096: 5000 / 6200},
    }
    assert source_b["before"] == {
        "docs": 4,
        "tokens": 3020,
        "at_least": {256: 3000 / 3020, 1024: 2000 / 3020, 4096: 0.0},
    }
    assert source_b["after"] == {"docs": 1, "tokens": 2000, "at_least": {256: 1.0, 1024: 1.0, 4096: 0.0}}
    expected_before = {
        256: 0.75 * 6400 / 6750 + 0.25 * 3000 / 3020,
        1024: 0.75 * 6100 / 6750 + 0.25 * 2000 / 3020,
    }
    expected_before[4096] = 0.75 * 5000 / 6750
    expected_after = {
        256: 0.75 * 6100 / 6200 + 0.25,
        1024: 0.75 * 6100 / 6200 + 0.25,
        4096: 0.75 * 5000 / 6200,
    }
    assert got["overall"]["before"] == pytest.approx(expected_before, rel=1e-12)
    assert got["overall"]["after"] == pytest.approx(expected_after, rel=1e-12)
    # Without a long pool the pools train exactly the sources' kept documents at their weights.
    assert not got["long_pool"]
    assert got["trained"] == pytest.approx(expected_after, rel=1e-9)

    # The default thresholds: the ladder plus seq_len and the short-document threshold; the log shows them.
    assert dataset.length_distribution()["thresholds"] == length_thresholds(SEQ_LEN, 1024)
    assert length_thresholds(SEQ_LEN, 1024) == [64, 256, 1024, 4096, 16384, 32768, 131072]
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "of >= 64 / 256 / 1K / 4K / 16K / 32K / 128K tokens, before -> after up-sampling" in m for m in lines
    )
    assert any(
        m.startswith("  a (weight 0.750): ") and "(6,750 -> 6,200 tokens, 6 -> 3 docs)" in m for m in lines
    )


def test_distribution_counts_the_long_pool_as_trained(stores: dict[str, ArrayDocumentStore]) -> None:
    """`trained` against the training stream itself: five mixture blocks of samples, each sample's tokens counted
    by the length of the document they come from (read from the stores). Observed error: 3.6e-4 at 100 tokens,
    8e-5 at 300, 3e-6 at 150 (the long pool's partial epochs and its pieces' one-token overlaps); without the
    fill correction the long pool's share would be off by 0.027."""
    dataset = build(make_config(WEIGHTS, long_threshold=150, long_share=0.4), stores, planned=100)
    got = dataset.length_distribution([100, 150, 300])
    assert got["long_pool"]
    lengths = {name: stores[name].doc_lengths() for name in WEIGHTS}
    at_least, total = dict.fromkeys((100, 150, 300), 0), 0
    for g in range(5 * MIXTURE_BLOCK):
        for source, doc, _, length in dataset.describe_sample(g):
            total += length
            for threshold in at_least:
                at_least[threshold] += length if lengths[source][doc] >= threshold else 0
    for threshold, tokens in at_least.items():
        assert got["trained"][threshold] == pytest.approx(tokens / total, abs=1e-3), threshold
    # Every document of 150 tokens or more trains in the long pool (no short pool holds one), so the trained
    # share at 300 is the share at 150 times the part of those documents' tokens in documents of 300 or more.
    long = np.concatenate([lengths[name][lengths[name] >= 150] for name in WEIGHTS])
    assert got["trained"][300] == pytest.approx(
        got["trained"][150] * long[long >= 300].sum() / long.sum(), rel=1e-9
    )


# --------------------------------------------------------------------------------------- labels


@settings(max_examples=20, deadline=None)
@given(
    short=st.lists(st.lists(st.integers(2, 39), min_size=1, max_size=20), min_size=1, max_size=3),
    long=st.lists(st.integers(40, 160), min_size=1, max_size=8),
    seq_len=st.integers(8, 24),
    mode=st.sampled_from(["best_fit", "concat"]),
    keep=st.sampled_from([0.2, 0.5, 0.9]),
    seed=st.integers(0, 99),
)
def test_upsampled_mixture_trains_each_kept_token_once_per_epoch(
    short: list[list[int]], long: list[int], seq_len: int, mode: str, keep: float, seed: int
) -> None:
    # Source i holds its short documents, one of 30 tokens (always kept, so no source is emptied), and every
    # len(short)-th long one; documents under 20 tokens are kept with `keep`. Tokens are unique across sources.
    per_source = [[*lengths, 30, *long[i :: len(short)]] for i, lengths in enumerate(short)]
    all_lengths = [n for lengths in per_source for n in lengths]
    docs, doc_first = unique_documents(all_lengths)
    stores, at = {}, 0
    for i, lengths in enumerate(per_source):
        stores[f"s{i}"] = ArrayDocumentStore.from_documents(docs[at : at + len(lengths)])
        at += len(lengths)
    config = DataConfig(
        name="labels",
        sources={name: SourceConfig(kind="jsonl", paths=["unused"]) for name in stores},
        packing=PackingConfig(
            seq_len=seq_len,
            mode=mode,
            long_threshold=40,
            long_share=0.3,
            short_doc_threshold=20,
            short_doc_keep=keep,
            window_docs=8,
        ),
        max_repetition=1000.0,
        seed=seed,
    )
    dataset = MixtureDataset(config, pad_id=PAD, tokenizer_fingerprint=None, stores=stores)
    assert dataset.pools[-1].name == LONG_POOL
    kept = np.concatenate([dataset.source_kept(name) for name in stores])
    expected = np.concatenate(
        [
            np.arange(first + 1, first + n)
            for first, n, k in zip(doc_first, all_lengths, kept, strict=True)
            if k
        ]
    )
    n_seq = [pool.n_seq for pool in dataset.pools]
    supplied = [0] * len(n_seq)
    epochs: list[list[dict[str, np.ndarray]]] = [[], []]
    for g in itertools.count():
        if all(count >= 2 * n for count, n in zip(supplied, n_seq, strict=True)):
            break
        pool, k = dataset.locate(g)
        if k < 2 * n_seq[pool]:
            epochs[k // n_seq[pool]].append(dataset[g])
            supplied[pool] += 1
    for samples in epochs:
        # Every unmasked target is the next token of its own document (checked inside), and the kept documents'
        # tokens but their first are the targets, each exactly once.
        got = np.sort(np.concatenate(epoch_targets(samples, doc_first)))
        assert np.array_equal(got, np.sort(expected))
