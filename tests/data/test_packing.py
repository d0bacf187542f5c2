"""Packing: every document covered by pieces that overlap by one token, nothing over capacity, document boundaries
in every sample."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.packing import (
    ArrayDocumentStore,
    ConcatDocumentStore,
    PackedIndex,
    materialize,
    pack_best_fit,
    pack_concat,
    pack_documents,
)

PAD = 0


def unique_token_store(lengths: list[int]) -> ArrayDocumentStore:
    """Documents whose tokens are their global positions + 1, so every token is distinguishable from padding."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return ArrayDocumentStore(np.arange(1, int(offsets[-1]) + 1, dtype=np.int64), offsets)


def check_packing(store: ArrayDocumentStore, index: PackedIndex, doc_ids: np.ndarray | None = None) -> None:
    capacity = index.capacity
    lengths = store.doc_lengths()
    chosen = np.arange(len(lengths)) if doc_ids is None else doc_ids
    for seq in range(index.n_sequences):
        sample = materialize(store, index, seq, PAD)
        tokens, positions, docs = sample["tokens"], sample["position_ids"], sample["document_ids"]
        assert tokens.shape == positions.shape == docs.shape == (capacity,)
        assert tokens.dtype == np.int64 and positions.dtype == np.int64 and docs.dtype == np.int32
        real = docs >= 0
        # Real tokens first, then padding.
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()
        assert (tokens[~real] == PAD).all() and (tokens[real] != PAD).all()
        # A new run (document or padding) starts exactly where the position id is 0.
        starts = np.flatnonzero(positions == 0)
        changes = np.concatenate([[0], np.flatnonzero(np.diff(docs) != 0) + 1])
        assert np.array_equal(starts, changes)
        # Positions count up by one inside a run; document ids count 0, 1, 2.. per segment.
        inside = np.ones(capacity, dtype=bool)
        inside[starts] = False
        assert (positions[inside] == positions[np.flatnonzero(inside) - 1] + 1).all()
        assert np.array_equal(np.unique(docs[real]), np.arange(len(index.segments(seq)[0])))
        # Inside a segment, tokens are consecutive positions of one document (tokens are global positions).
        for j, (doc, start, length) in enumerate(zip(*index.segments(seq), strict=True)):
            segment = tokens[docs == j]
            assert len(segment) == length
            assert np.array_equal(segment, store.read(int(doc), int(start), int(length)))
    assert (index.seg_len > 0).all() and (index.seg_len <= capacity).all()
    # Each chosen document is covered by its pieces in order: the first starts at 0, the last ends at the end,
    # and each piece starts at the previous one's last token (context for the next piece's first target).
    chosen_nonempty = [int(d) for d in chosen if lengths[d] > 0]
    assert sorted(set(index.seg_doc.tolist())) == sorted(chosen_nonempty)
    for doc in chosen_nonempty:
        where = np.flatnonzero(index.seg_doc == doc)
        where = where[np.lexsort((index.seg_len[where], index.seg_start[where]))]
        starts, ends = index.seg_start[where], index.seg_start[where] + index.seg_len[where]
        assert starts[0] == 0 and ends[-1] == lengths[doc]
        assert np.array_equal(starts[1:], ends[:-1] - 1), "consecutive pieces overlap by exactly one token"
    stats = index.stats
    packed = int(index.seg_len.sum())
    assert stats.n_tokens == int(lengths[np.asarray(chosen_nonempty, dtype=np.int64)].sum())
    assert stats.overlap_tokens == packed - stats.n_tokens == len(index.seg_doc) - len(chosen_nonempty)
    assert stats.padding_tokens == index.n_sequences * capacity - packed


lengths_strategy = st.lists(st.integers(min_value=0, max_value=70), min_size=0, max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_strategy, capacity=st.integers(2, 33), window=st.integers(1, 25), seed=st.integers(0, 9)
)
def test_best_fit_properties(lengths: list[int], capacity: int, window: int, seed: int) -> None:
    store = unique_token_store(lengths)
    index = pack_best_fit(store.doc_lengths(), capacity, seed=seed, window_docs=window)
    check_packing(store, index)
    # A document is split only when longer than the capacity, into full chunks and at most one remainder: as
    # few pieces as hold its n - 1 targets at capacity - 1 each (pieces overlap by one token).
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    pieces = (
        np.bincount(index.seg_doc, minlength=len(lengths)) if len(index.seg_doc) else np.zeros(len(lengths))
    )
    nonempty = lengths_arr > 0
    assert np.array_equal(pieces[~nonempty], np.zeros(int((~nonempty).sum())))
    assert np.array_equal(pieces[nonempty], np.maximum(1, -(-(lengths_arr[nonempty] - 1) // (capacity - 1))))
    assert np.array_equal(pieces[nonempty] > 1, lengths_arr[nonempty] > capacity)
    assert index.stats.split_docs == int((lengths_arr > capacity).sum())
    # Every piece of a split document but its last (the remainder, if any) is a full sequence of its own.
    for doc in np.flatnonzero(lengths_arr > capacity):
        where = np.flatnonzero(index.seg_doc == doc)
        by_start = index.seg_len[where][np.argsort(index.seg_start[where])]
        assert (by_start[:-1] == capacity).all()


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(2, 33), seed=st.integers(0, 9))
def test_concat_properties(lengths: list[int], capacity: int, seed: int) -> None:
    store = unique_token_store(lengths)
    index = pack_concat(store.doc_lengths(), capacity, seed=seed)
    check_packing(store, index)
    # Only the last sequence may be padded; a document's pieces are consecutive and in order; each sequence
    # starts with the last token of the one before, so the stream advances by capacity - 1 per sequence.
    filled = index.sequence_lengths()
    assert (filled[:-1] == capacity).all()
    total = sum(lengths)
    assert index.n_sequences == (-(-(total - 1) // (capacity - 1)) if total > 1 else total)
    for doc in np.unique(index.seg_doc):
        where = np.flatnonzero(index.seg_doc == doc)
        assert (np.diff(where) == 1).all()
        assert np.array_equal(
            index.seg_start[where], np.concatenate([[0], np.cumsum(index.seg_len[where] - 1)[:-1]])
        )
    samples = [materialize(store, index, seq, PAD)["tokens"] for seq in range(index.n_sequences)]
    for before, after in itertools.pairwise(samples):
        assert after[0] == before[-1]
    # A document counts as cut when its targets (every token but its first) lie in more than one sequence,
    # i.e. it has two or more pieces of at least two tokens.
    long_pieces = np.bincount(index.seg_doc[index.seg_len >= 2], minlength=len(lengths))
    assert index.stats.split_docs == int((long_pieces >= 2).sum())


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    mode=st.sampled_from(["best_fit", "concat"]),
)
def test_subset_of_documents(lengths: list[int], mode: str) -> None:
    store = unique_token_store(lengths)
    subset = np.arange(0, len(lengths), 2)
    index = pack_documents(store.doc_lengths(), 17, mode=mode, seed=3, window_docs=7, doc_ids=subset)
    check_packing(store, index, subset)


@pytest.mark.parametrize("mode", ["best_fit", "concat"])
def test_deterministic_for_a_seed(mode: str) -> None:
    lengths = np.random.default_rng(0).integers(1, 300, size=2000)
    a = pack_documents(lengths, 129, mode=mode, seed=5, window_docs=100)
    b = pack_documents(lengths, 129, mode=mode, seed=5, window_docs=100)
    c = pack_documents(lengths, 129, mode=mode, seed=6, window_docs=100)
    for name in ("seq_offsets", "seg_doc", "seg_start", "seg_len"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.seg_doc, c.seg_doc)


def test_best_fit_wastes_little_and_concat_cuts_documents() -> None:
    lengths = np.random.default_rng(1).integers(10, 200, size=5000)
    best = pack_best_fit(lengths, 257, seed=0, window_docs=1000)
    concat = pack_concat(lengths, 257, seed=0)
    assert best.stats.padding_fraction < 0.02
    assert best.stats.split_docs == 0 and best.stats.overlap_tokens == 0
    assert concat.stats.padding_tokens < 257
    assert concat.stats.split_docs > 0
    assert concat.stats.overlap_tokens == concat.n_sequences - 1
    assert "padding" in best.stats.describe()


def test_long_document_chunks_are_full_sequences() -> None:
    store = unique_token_store([25, 3])
    index = pack_best_fit(store.doc_lengths(), 10, seed=0, window_docs=10)
    filled = sorted(index.sequence_lengths().tolist())
    # 25 tokens as [0, 10), [9, 19) and the remainder [18, 25): each piece starts on the previous one's last
    # token; the 7-token remainder shares a sequence with the 3-token document.
    assert filled == [10, 10, 10]
    first_doc = index.seg_doc == 0
    pieces = sorted(zip(index.seg_start[first_doc].tolist(), index.seg_len[first_doc].tolist(), strict=True))
    assert pieces == [(0, 10), (9, 10), (18, 7)]


def test_concat_store_addresses_documents_across_stores() -> None:
    a = ArrayDocumentStore.from_documents([np.array([1, 2, 3]), np.array([4])])
    b = ArrayDocumentStore.from_documents([np.array([5, 6])])
    both = ConcatDocumentStore([a, b])
    assert both.doc_lengths().tolist() == [3, 1, 2]
    assert both.read(2, 1, 1).tolist() == [6]
    assert both.store_of(np.array([0, 1, 2])).tolist() == [0, 0, 1]


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match="capacity"):
        pack_concat(np.array([3]), 1, seed=0)
    with pytest.raises(ValueError, match="window_docs"):
        pack_best_fit(np.array([3]), 4, seed=0, window_docs=0)
    with pytest.raises(ValueError, match="mode"):
        pack_documents(np.array([3]), 4, mode="greedy", seed=0)
