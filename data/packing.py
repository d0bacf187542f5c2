"""Packing documents into fixed-capacity training sequences, kept as a compact numpy index.

A packed sequence holds `seq_len + 1` tokens (inputs are the first `seq_len`, labels the last `seq_len`). The
index never copies tokens: it lists segments (document id, start, length) per sequence, so a corpus of a
million documents packs in seconds and costs a few dozen bytes per document. Two modes:

* best-fit: documents are split only when longer than the capacity (full-capacity chunks become their own
  sequences, the remainder is packed like a short document); the pieces of each window of documents (in a
  seeded shuffled order) are packed best-fit-decreasing, which leaves little padding while keeping memory
  bounded and the order mixed;
* concat: documents in shuffled order are concatenated into one stream and sequence k is the stream's tokens
  [k * (capacity - 1), k * (capacity - 1) + capacity) (no padding except in the last sequence, but documents
  are cut across sequences).

Attention never crosses a segment, so a segment's first token is never a target (the loader masks every label
whose token lies in another segment). Consecutive pieces of a document therefore overlap by one token: the
last token of piece k is also the first of piece k + 1, where it serves as context only, so every token of a
document but its first is a target exactly once per epoch. A document of n tokens cut into pieces of at most
`capacity` tokens advances by `capacity - 1` per piece; `PackingStats.overlap_tokens` counts the repeats.

Each materialised sample carries its document boundaries (position ids restarting at 0 and a document id per
position) so the model can keep attention inside documents.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from data.log import get_logger

if TYPE_CHECKING:
    from data.shards import Shard

log = get_logger(__name__)

Seed = int | Sequence[int]
PAD_DOCUMENT_ID = -1


class DocumentStore(Protocol):
    """Random access to tokenized documents by a dense id in [0, n_docs)."""

    def doc_lengths(self) -> np.ndarray:
        """Token count of every document (int64)."""
        ...

    def read(self, doc: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of document `doc`."""
        ...

    def identity(self) -> str:
        """A string that changes whenever the documents' lengths (and so the packing) could change."""
        ...


class ArrayDocumentStore:
    """Documents held in memory as one token array and document offsets (tests, small corpora)."""

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        self.tokens = np.asarray(tokens)
        self.doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        if self.doc_offsets.ndim != 1 or len(self.doc_offsets) < 1 or self.doc_offsets[0] != 0:
            raise ValueError("doc_offsets must be a 1-d array starting at 0")
        if np.any(np.diff(self.doc_offsets) < 0) or self.doc_offsets[-1] != len(self.tokens):
            raise ValueError("doc_offsets must be non-decreasing and end at len(tokens)")

    @classmethod
    def from_documents(cls, docs: Sequence[np.ndarray]) -> ArrayDocumentStore:
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(list(docs)) if docs else np.zeros(0, dtype=np.int64)
        return cls(tokens, offsets)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def read(self, doc: int, start: int, length: int) -> np.ndarray:
        begin = int(self.doc_offsets[doc]) + start
        return self.tokens[begin : begin + length]

    def identity(self) -> str:
        digest = hashlib.sha256(self.doc_offsets.tobytes())
        digest.update(np.ascontiguousarray(self.tokens).tobytes())
        return f"array:{digest.hexdigest()}"


class ShardDocumentStore:
    """The documents of a list of shards (one source's split), addressed by one dense id across shards."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        counts = np.array([s.n_docs for s in self.shards], dtype=np.int64)
        self._doc_base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def doc_lengths(self) -> np.ndarray:
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(np.asarray(s.doc_offsets, dtype=np.int64)) for s in self.shards])

    def read(self, doc: int, start: int, length: int) -> np.ndarray:
        which = int(np.searchsorted(self._doc_base, doc, side="right")) - 1
        shard = self.shards[which]
        begin = int(shard.doc_offsets[doc - self._doc_base[which]]) + start
        return shard.tokens[begin : begin + length]

    def identity(self) -> str:
        # The shard checksum covers tokens and offsets, so it pins the document lengths too.
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.path.name}:{shard.n_docs}:{shard.n_tokens}:{shard.checksum};".encode())
        return f"shards:{digest.hexdigest()}"


class ConcatDocumentStore:
    """Several stores behind one dense id space: store i owns ids [base[i], base[i + 1])."""

    def __init__(self, stores: Sequence[DocumentStore]) -> None:
        self.stores = list(stores)
        self._lengths = [np.asarray(s.doc_lengths(), dtype=np.int64) for s in self.stores]
        counts = np.array([len(x) for x in self._lengths], dtype=np.int64)
        self.base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def store_of(self, doc: int | np.ndarray) -> int | np.ndarray:
        """Which store (by position) owns a global document id."""
        return np.searchsorted(self.base, doc, side="right") - 1

    def doc_lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)

    def read(self, doc: int, start: int, length: int) -> np.ndarray:
        which = int(self.store_of(doc))
        return self.stores[which].read(int(doc - self.base[which]), start, length)

    def identity(self) -> str:
        return "concat:" + hashlib.sha256("|".join(s.identity() for s in self.stores).encode()).hexdigest()


@dataclass(frozen=True)
class PackingStats:
    """Where the capacity of the packed sequences went."""

    mode: str
    capacity: int
    n_docs: int
    n_tokens: int  # document tokens, each counted once
    n_sequences: int
    padding_tokens: int
    # best-fit: documents longer than the capacity (split into chunks); concat: documents whose targets span
    # more than one sequence.
    split_docs: int
    # Tokens packed twice because consecutive pieces overlap by one (a piece's first token is context only).
    overlap_tokens: int = 0

    @property
    def padding_fraction(self) -> float:
        total = self.n_sequences * self.capacity
        return self.padding_tokens / total if total else 0.0

    def describe(self) -> str:
        split_what = "longer than capacity (split)" if self.mode == "best_fit" else "cut across sequences"
        return (
            f"{self.mode}: {self.n_docs} docs, {self.n_tokens} tokens -> {self.n_sequences} sequences of "
            f"{self.capacity}; padding {self.padding_tokens} tokens ({100 * self.padding_fraction:.2f}% of "
            f"capacity); {self.split_docs} docs {split_what}; {self.overlap_tokens} tokens repeated where "
            "pieces overlap"
        )


@dataclass(frozen=True)
class PackedIndex:
    """Sequence k is the segments [seq_offsets[k], seq_offsets[k + 1]) of (seg_doc, seg_start, seg_len)."""

    capacity: int
    seq_offsets: np.ndarray  # int64 [n_sequences + 1]
    seg_doc: np.ndarray  # int64 [n_segments], document id in the store
    seg_start: np.ndarray  # int64 [n_segments], first token within the document
    seg_len: np.ndarray  # int64 [n_segments]
    stats: PackingStats

    @property
    def n_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def segments(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = int(self.seq_offsets[seq]), int(self.seq_offsets[seq + 1])
        return self.seg_doc[lo:hi], self.seg_start[lo:hi], self.seg_len[lo:hi]

    def sequence_lengths(self) -> np.ndarray:
        """Real (non-padding) tokens of every sequence."""
        filled = np.zeros(self.n_sequences, dtype=np.int64)
        owner = np.repeat(np.arange(self.n_sequences), np.diff(self.seq_offsets))
        np.add.at(filled, owner, self.seg_len)
        return filled


def select_documents(lengths: np.ndarray, doc_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The document ids to pack (non-empty ones only) and the full length array as int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(len(lengths), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    return ids[lengths[ids] > 0], lengths


def check_capacity(capacity: int) -> None:
    if capacity < 2:
        raise ValueError(f"capacity must be at least 2 tokens (seq_len + 1), got {capacity}")


def _best_fit_decreasing(piece_lengths: list[int], capacity: int) -> tuple[list[int], int]:
    """Bin of every piece (pieces sorted longest first): the open bin with the least room that still fits.

    Open bins are kept in one sorted list of keys `room * stride + bin`, so finding the tightest bin is a
    bisect and the loop stays in fast list operations; full bins leave the list.
    """
    stride = len(piece_lengths) + 1
    open_keys: list[int] = []
    bin_of = [0] * len(piece_lengths)
    n_bins = 0
    for i, length in enumerate(piece_lengths):
        pos = bisect_left(open_keys, length * stride)
        if pos == len(open_keys):
            chosen, room = n_bins, capacity - length
            n_bins += 1
        else:
            key = open_keys.pop(pos)
            chosen, room = key % stride, key // stride - length
        bin_of[i] = chosen
        if room > 0:
            insort(open_keys, room * stride + chosen)
    return bin_of, n_bins


def _cut_into_pieces(docs: np.ndarray, lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, ...]:
    """Full-capacity chunks of each document, and the remainder piece (if any) of each.

    Pieces overlap by one token, so piece k starts at k * (capacity - 1): a document of n tokens has n - 1
    targets, a full chunk holds capacity - 1 of them, and the remainder the rest plus the token before them. A
    document of at most `capacity` tokens is one piece; a remainder of a single token would add no target and
    is dropped (it is the last token of the previous chunk).
    """
    stride = capacity - 1
    n_full = (lengths - 1) // stride
    total_full = int(n_full.sum())
    full_doc = np.repeat(docs, n_full)
    first_chunk = np.repeat(np.cumsum(n_full) - n_full, n_full)
    full_start = (np.arange(total_full, dtype=np.int64) - first_chunk) * stride
    rem_start = n_full * stride
    rem = lengths - rem_start
    has_rem = (rem > 1) | (n_full == 0)
    return full_doc, full_start, docs[has_rem], rem_start[has_rem], rem[has_rem]


def _index_from_bins(
    bins: np.ndarray, doc: np.ndarray, start: np.ndarray, length: np.ndarray, n_bins: int
) -> tuple[np.ndarray, ...]:
    """Group the pieces by bin (stable, so a bin keeps its pieces' packing order) into index arrays."""
    order = np.argsort(bins, kind="stable")
    counts = np.bincount(bins, minlength=n_bins)
    seq_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return seq_offsets, doc[order], start[order], length[order]


def pack_best_fit(
    lengths: np.ndarray,
    capacity: int,
    *,
    seed: Seed,
    window_docs: int,
    doc_ids: np.ndarray | None = None,
) -> PackedIndex:
    """Best-fit-decreasing packing within windows of `window_docs` documents taken in a seeded shuffled order.

    `lengths` holds every document's token count; `doc_ids` (default: all) picks which ones to pack.
    """
    check_capacity(capacity)
    if window_docs < 1:
        raise ValueError(f"window_docs must be at least 1, got {window_docs}")
    ids, lengths = select_documents(lengths, doc_ids)
    ids = np.random.default_rng(seed).permutation(ids)
    bins_parts, doc_parts, start_parts, len_parts = [], [], [], []
    n_bins = 0
    for lo in range(0, len(ids), window_docs):
        window = ids[lo : lo + window_docs]
        full_doc, full_start, rem_doc, rem_start, rem_len = _cut_into_pieces(
            window, lengths[window], capacity
        )
        # Full-capacity chunks are sequences of their own, in document order.
        bins_parts.append(n_bins + np.arange(len(full_doc), dtype=np.int64))
        doc_parts.append(full_doc)
        start_parts.append(full_start)
        len_parts.append(np.full(len(full_doc), capacity, dtype=np.int64))
        n_bins += len(full_doc)
        longest_first = np.argsort(-rem_len, kind="stable")
        bin_of, used = _best_fit_decreasing(rem_len[longest_first].tolist(), capacity)
        bins_parts.append(n_bins + np.asarray(bin_of, dtype=np.int64))
        doc_parts.append(rem_doc[longest_first])
        start_parts.append(rem_start[longest_first])
        len_parts.append(rem_len[longest_first])
        n_bins += used
    empty = np.zeros(0, dtype=np.int64)
    bins = np.concatenate(bins_parts) if bins_parts else empty
    seq_offsets, seg_doc, seg_start, seg_len = _index_from_bins(
        bins,
        np.concatenate(doc_parts) if doc_parts else empty,
        np.concatenate(start_parts) if start_parts else empty,
        np.concatenate(len_parts) if len_parts else empty,
        n_bins,
    )
    n_tokens = int(lengths[ids].sum())
    packed = int(seg_len.sum())
    stats = PackingStats(
        mode="best_fit",
        capacity=capacity,
        n_docs=len(ids),
        n_tokens=n_tokens,
        n_sequences=n_bins,
        padding_tokens=n_bins * capacity - packed,
        split_docs=int(np.count_nonzero(lengths[ids] > capacity)),
        overlap_tokens=packed - n_tokens,
    )
    return PackedIndex(capacity, seq_offsets, seg_doc, seg_start, seg_len, stats)


def pack_concat(
    lengths: np.ndarray, capacity: int, *, seed: Seed, doc_ids: np.ndarray | None = None
) -> PackedIndex:
    """Concatenate the documents in a seeded shuffled order and cut the stream into overlapping sequences.

    Sequence k holds stream tokens [k * stride, k * stride + capacity) with stride = capacity - 1: its first
    token is the last of sequence k - 1, context only, so every stream token but a document's first is a target
    exactly once. Only the last sequence is padded; a document crossing a sequence boundary continues, in
    order, in the next sequence, so consecutive sequences hold a long document contiguously. Where the
    boundary token ends a document (or starts one) it forms a one-token segment with no target: the same one
    position per sequence that the overlap costs anyway. The number of sequences depends only on the total.
    """
    check_capacity(capacity)
    ids, lengths = select_documents(lengths, doc_ids)
    order = np.random.default_rng(seed).permutation(ids)
    stride = capacity - 1
    doc_len = lengths[order]
    doc_end = np.cumsum(doc_len)
    doc_begin = doc_end - doc_len
    total = int(doc_end[-1]) if len(doc_end) else 0
    n_seq = -(-(total - 1) // stride) if total > 1 else total
    # Segments start where a sequence starts and where a document starts inside one. Document start b lies in
    # sequence b // stride at b % stride and, when that is 0 (and b > 0), also last in the sequence before.
    seq_first = np.arange(n_seq, dtype=np.int64)
    q, r = np.divmod(doc_begin, stride)
    inner, last = r > 0, (r == 0) & (q > 0)
    cut_seq = np.concatenate([seq_first, q[inner], q[last] - 1])
    cut_at = np.concatenate([seq_first * stride, doc_begin[inner], doc_begin[last]])
    by_place = np.argsort(cut_seq * capacity + (cut_at - cut_seq * stride), kind="stable")
    cut_seq, cut_at = cut_seq[by_place], cut_at[by_place]
    seq_stop = np.minimum(cut_seq * stride + capacity, total)
    # A document's targets are its tokens 1..n-1, and stream target p falls in sequence (p - 1) // stride.
    spans = (doc_len >= 2) & (doc_begin // stride != (doc_end - 2) // stride)
    split_docs = int(np.count_nonzero(spans))
    return index_from_cuts(
        "concat", capacity, n_seq, cut_seq, cut_at, seq_stop, order, doc_begin, total, split_docs
    )


def index_from_cuts(
    mode: str,
    capacity: int,
    n_seq: int,
    cut_seq: np.ndarray,
    cut_at: np.ndarray,
    seq_stop: np.ndarray,
    order: np.ndarray,
    doc_begin: np.ndarray,
    n_tokens: int,
    split_docs: int,
) -> PackedIndex:
    """The index of a stream packed into `n_seq` sequences, from where its segments start.

    The documents `order` lie back to back in one stream, document i from `doc_begin[i]`. Segment j starts at
    stream position `cut_at[j]` in sequence `cut_seq[j]` (sorted by sequence, then by place in it) and runs to
    the next segment's start in the same sequence, or else to `seq_stop[j]`, after which the sequence is padded.
    `n_tokens` (the documents' total) and `split_docs` (those with targets in more than one sequence) go to the
    stats.
    """
    same_seq_next = np.zeros(len(cut_seq), dtype=bool)
    same_seq_next[:-1] = cut_seq[1:] == cut_seq[:-1]
    seg_end = np.where(same_seq_next, np.append(cut_at[1:], 0), seq_stop)
    owner = np.searchsorted(doc_begin, cut_at, side="right") - 1
    seq_offsets = np.searchsorted(cut_seq, np.arange(n_seq + 1), side="left").astype(np.int64)
    seg_len = (seg_end - cut_at).astype(np.int64)
    packed = int(seg_len.sum())
    return PackedIndex(
        capacity,
        seq_offsets,
        order[owner].astype(np.int64),
        (cut_at - doc_begin[owner]).astype(np.int64),
        seg_len,
        PackingStats(
            mode=mode,
            capacity=capacity,
            n_docs=len(order),
            n_tokens=n_tokens,
            n_sequences=n_seq,
            padding_tokens=n_seq * capacity - packed,
            split_docs=split_docs,
            overlap_tokens=packed - n_tokens,
        ),
    )


def pack_documents(
    lengths: np.ndarray,
    capacity: int,
    *,
    mode: str,
    seed: Seed,
    window_docs: int = 20_000,
    doc_ids: np.ndarray | None = None,
) -> PackedIndex:
    """Pack with `mode` ("best_fit" or "concat", as in `data.packing.mode`)."""
    if mode == "best_fit":
        return pack_best_fit(lengths, capacity, seed=seed, window_docs=window_docs, doc_ids=doc_ids)
    if mode == "concat":
        return pack_concat(lengths, capacity, seed=seed, doc_ids=doc_ids)
    raise ValueError(f"data.packing.mode: unknown packing mode {mode!r}; use 'best_fit' or 'concat'")


def materialize(store: DocumentStore, index: PackedIndex, seq: int, pad_id: int) -> dict[str, np.ndarray]:
    """The sample dict of sequence `seq`: tokens, position ids and document ids, each of `capacity` entries.

    Position ids restart at 0 at every segment start (a document or a chunk of one); document ids count the
    segments 0, 1, 2.. within the sequence and are -1 on padding, where position ids count 0, 1, 2.. again
    (one padding run), so a new run always begins exactly where the position id is 0.
    """
    capacity = index.capacity
    tokens = np.full(capacity, pad_id, dtype=np.int64)
    position_ids = np.empty(capacity, dtype=np.int64)
    document_ids = np.full(capacity, PAD_DOCUMENT_ID, dtype=np.int32)
    at = 0
    for j, (doc, start, length) in enumerate(zip(*index.segments(seq), strict=True)):
        length = int(length)
        tokens[at : at + length] = store.read(int(doc), int(start), length)
        position_ids[at : at + length] = np.arange(length)
        document_ids[at : at + length] = j
        at += length
    position_ids[at:] = np.arange(capacity - at)
    return {"tokens": tokens, "position_ids": position_ids, "document_ids": document_ids}
