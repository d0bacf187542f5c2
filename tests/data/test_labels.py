"""Labels of packed batches: no position is trained on a token its attention cannot see, and every token of a
document but its first (the BOS) is a target exactly once per epoch, for best-fit, concat and the long pool.

Every token in these corpora is unique (its global position + 1), so a label names the exact document and offset
it came from, and "the next token of the same document" is a value check.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.config import DataConfig, PackingConfig, SourceConfig
from data.loader import IGNORE_INDEX, collate
from data.mixture import LONG_POOL, MixtureDataset
from data.packing import ArrayDocumentStore, materialize, pack_documents

PAD = 0
BATCH = 8


def unique_documents(lengths: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents of the given lengths whose tokens are 1, 2, 3.. across all of them, and each one's first token."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    docs = [np.arange(lo + 1, hi + 1, dtype=np.int64) for lo, hi in itertools.pairwise(offsets)]
    return docs, offsets[:-1] + 1


def checked_targets(batch: dict[str, torch.Tensor], doc_first: np.ndarray) -> np.ndarray:
    """The unmasked targets of a collated batch, each checked to be the next token of its position's document."""
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    kept = labels != IGNORE_INDEX
    at, target = inputs[kept], labels[kept]
    assert (at != PAD).all(), "a padding position has a target"
    assert np.array_equal(target, at + 1), "a target is not the token that follows its position"
    document = np.searchsorted(doc_first, at, side="right"), np.searchsorted(doc_first, target, side="right")
    assert np.array_equal(*document), "a target lies in another document than its position"
    return target


def assert_each_target_once(targets: list[np.ndarray], lengths: list[int], doc_first: np.ndarray) -> None:
    """Every token but each document's first is a target exactly once, and nothing else is."""
    total = int(sum(lengths))
    firsts = doc_first[np.asarray(lengths, dtype=np.int64) > 0]
    expected = np.setdiff1d(np.arange(1, total + 1, dtype=np.int64), firsts)
    got = np.sort(np.concatenate([*targets, np.zeros(0, dtype=np.int64)]))
    assert np.array_equal(got, expected), "some document token is not a target exactly once"


def epoch_targets(samples: list[dict[str, np.ndarray]], doc_first: np.ndarray) -> list[np.ndarray]:
    return [
        checked_targets(collate(samples[i : i + BATCH]), doc_first) for i in range(0, len(samples), BATCH)
    ]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 80), max_size=50),
    capacity=st.integers(2, 33),
    mode=st.sampled_from(["best_fit", "concat"]),
    window=st.integers(1, 20),
    seed=st.integers(0, 9),
)
def test_packed_labels_stay_in_their_document_and_cover_it_once(
    lengths: list[int], capacity: int, mode: str, window: int, seed: int
) -> None:
    docs, doc_first = unique_documents(lengths)
    store = ArrayDocumentStore(
        np.concatenate([*docs, np.zeros(0, np.int64)]), np.concatenate([[0], np.cumsum(lengths)])
    )
    index = pack_documents(store.doc_lengths(), capacity, mode=mode, seed=seed, window_docs=window)
    samples = [materialize(store, index, seq, PAD) for seq in range(index.n_sequences)]
    assert_each_target_once(epoch_targets(samples, doc_first), lengths, doc_first)


@settings(max_examples=20, deadline=None)
@given(
    short=st.lists(st.lists(st.integers(2, 39), min_size=1, max_size=20), min_size=1, max_size=3),
    long=st.lists(st.integers(40, 160), min_size=1, max_size=8),
    seq_len=st.integers(8, 24),
    mode=st.sampled_from(["best_fit", "concat"]),
    seed=st.integers(0, 99),
)
def test_mixture_with_long_pool_trains_each_token_once_per_epoch(
    short: list[list[int]], long: list[int], seq_len: int, mode: str, seed: int
) -> None:
    # Source i holds its short documents and every len(short)-th long one; tokens are unique across sources.
    per_source = [lengths + long[i :: len(short)] for i, lengths in enumerate(short)]
    all_lengths = [n for lengths in per_source for n in lengths]
    docs, doc_first = unique_documents(all_lengths)
    stores, at = {}, 0
    for i, lengths in enumerate(per_source):
        stores[f"s{i}"] = ArrayDocumentStore.from_documents(docs[at : at + len(lengths)])
        at += len(lengths)
    config = DataConfig(
        name="labels",
        sources={name: SourceConfig(kind="jsonl", paths=["unused"]) for name in stores},
        packing=PackingConfig(seq_len=seq_len, mode=mode, long_threshold=40, long_share=0.3, window_docs=8),
        max_repetition=100.0,
        seed=seed,
    )
    dataset = MixtureDataset(config, pad_id=PAD, tokenizer_fingerprint=None, stores=stores)
    assert dataset.pools[-1].name == LONG_POOL
    # Walk the global order until every pool has supplied two epochs; the long pool is re-packed per epoch.
    n_seq = [pool.n_seq for pool in dataset.pools]
    supplied = [0] * len(n_seq)
    epochs: list[list[dict[str, np.ndarray]]] = [[], []]
    g = 0
    while any(count < 2 * n for count, n in zip(supplied, n_seq, strict=True)):
        pool, k = dataset.locate(g)
        if k < 2 * n_seq[pool]:
            epochs[k // n_seq[pool]].append(dataset[g])
            supplied[pool] += 1
        g += 1
    for samples in epochs:
        assert_each_target_once(epoch_targets(samples, doc_first), all_lengths, doc_first)
