"""The length side of the training mix: which documents a long-context stage keeps, how the long pool lays out
documents that fill whole sequences, and the length distribution of what is trained.

Long-context continued pretraining trains at a longer `seq_len` on data whose sources keep their token shares
but whose long documents are up-sampled inside each source. Up-sampling here means dropping: a document of the
training split shorter than `data.packing.short_doc_threshold` tokens is kept with probability
`data.packing.short_doc_keep`, a longer one always, so within a source the long documents take the share the
dropped short ones leave, while the source weights (token shares of the kept documents) still set the mix
between sources. The validation split is never up-sampled: evaluation should see the natural distribution.

The decision for a document is a pure function of (data.seed, source name, the document's index in the
source's split): no state, no rank, no order of evaluation enters it, so every rank, every restart and every
world size keeps the same documents, and a document kept at one probability is kept at every higher one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.config import ConfigError, DataConfig
from data.packing import PackedIndex, PackingStats, check_capacity, index_from_cuts, select_documents

# Thresholds of the length distribution: the tiny CPU demo's documents are a few hundred to a few thousand
# tokens, a real corpus' long tail reaches 32K and beyond; the run's seq_len and short-document threshold are
# added to these (`length_thresholds`).
LENGTH_LADDER = (256, 1024, 4096, 16384, 32768, 131072)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def keep_draws(n_docs: int, *, seed: int, source: str) -> np.ndarray:
    """One uniform number in [0, 1) per document index of a source, from (seed, source, index) alone.

    A counter-based hash (splitmix64 over the index, keyed by a digest of seed and source name) instead of a
    generator stream, so a document's draw does not depend on how many documents precede or follow it.
    """
    digest = hashlib.sha256(f"short_doc_keep:{seed}:{source}".encode()).digest()
    key = np.uint64(int.from_bytes(digest[:8], "little"))
    x = (np.arange(n_docs, dtype=np.uint64) + np.uint64(1)) * _GOLDEN + key  # wraps modulo 2**64, as meant
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def kept_documents(lengths: np.ndarray, *, threshold: int, keep: float, seed: int, source: str) -> np.ndarray:
    """Which documents of a source's training split are trained on (a boolean mask over its documents).

    Documents of at least `threshold` tokens are always kept, shorter ones where their draw is below `keep`.
    `threshold` 0 or `keep` 1 keeps everything.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if threshold <= 0 or keep >= 1.0:
        return np.ones(len(lengths), dtype=bool)
    return (lengths >= threshold) | (keep_draws(len(lengths), seed=seed, source=source) < keep)


def keep_mask(sources: Mapping[str, np.ndarray], *, threshold: int, keep: float, seed: int) -> np.ndarray:
    """`kept_documents` of every source (name -> document lengths), concatenated in the sources' order."""
    masks = [
        kept_documents(lengths, threshold=threshold, keep=keep, seed=seed, source=name)
        for name, lengths in sources.items()
    ]
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def check_kept(name: str, lengths: np.ndarray, kept: np.ndarray, config: DataConfig, split: str) -> None:
    """Fail naming the up-sampling keys when they dropped every document of a source (an empty source is the
    caller's other error: nothing to keep was prepared)."""
    present = np.asarray(lengths) > 0
    if present.any() and not (present & kept).any():
        packing = config.packing
        raise ConfigError(
            f"data.sources.{name}: data.packing.short_doc_threshold={packing.short_doc_threshold} with "
            f"data.packing.short_doc_keep={packing.short_doc_keep} keeps none of its {int(present.sum())} "
            f"{split} documents (all shorter than {packing.short_doc_threshold} tokens); raise "
            "data.packing.short_doc_keep, lower data.packing.short_doc_threshold, or remove the source"
        )


def pack_long_aligned(
    lengths: np.ndarray, capacity: int, *, seed: int | Sequence[int], doc_ids: np.ndarray | None = None
) -> PackedIndex:
    """Concat-and-chunk in a seeded shuffled order, except that a document of at least `capacity - 1` tokens
    (the sequence length) starts a fresh sequence: it fills whole sequences and only its last piece (its tail)
    shares a sequence, with the documents after it.

    Plain concat packing starts every document where the previous one stopped, so a document of 2.5 sequences
    gets 1 whole sequence (in 3) or 2 (in 4), each half the time, and its head shares a sequence with another
    document: at the stage's sequence length that wastes what a long document is for. Here it always gets 2
    whole sequences and a tail.

    The stream is cut into groups, each starting at a sequence start: a document that fills a sequence and the
    shorter documents after it. A group is laid out exactly as `pack_concat` lays out a stream (sequence k holds
    stream tokens [k * stride, k * stride + capacity), stride = capacity - 1, so consecutive sequences overlap
    by one token and every token but a document's first is a target exactly once), and the room a group leaves
    in its last sequence is padding, since the next group's document would only lose its head there. Without
    such documents the result is `pack_concat`'s.
    """
    check_capacity(capacity)
    ids, lengths = select_documents(lengths, doc_ids)
    order = np.random.default_rng(seed).permutation(ids)
    stride = capacity - 1
    doc_len = lengths[order]
    if len(order) == 0:
        empty = np.zeros(0, dtype=np.int64)
        stats = PackingStats("aligned", capacity, 0, 0, 0, 0, 0, 0)
        return PackedIndex(capacity, np.zeros(1, dtype=np.int64), empty, empty, empty, stats)
    # Groups: each document of a whole sequence or more starts one (and so does the first document). Positions
    # are kept per group (`local`) and in the gap-free concatenation of all documents (`flat`).
    opens = doc_len >= max(stride, 2)
    opens[0] = True
    group = np.cumsum(opens) - 1
    flat_begin = np.cumsum(doc_len) - doc_len
    group_flat = flat_begin[opens]
    local = flat_begin - group_flat[group]
    group_len = np.bincount(group, weights=doc_len).astype(np.int64)
    # A group of T tokens takes ceil((T - 1) / stride) sequences (T - 1 targets, stride per sequence).
    group_seqs = np.where(group_len > 1, -(-(group_len - 1) // stride), group_len)
    group_seq0 = np.cumsum(group_seqs) - group_seqs
    n_seq = int(group_seqs.sum())
    # Segments start where a sequence starts and where a document starts inside one; a document that starts a
    # sequence inside its group also ends the sequence before as a one-token segment, as in `pack_concat` (one
    # that opens a group starts at local position 0 and has no sequence before it in its group).
    seq_group = np.repeat(np.arange(len(group_seqs)), group_seqs)
    window = np.arange(n_seq, dtype=np.int64) - group_seq0[seq_group]
    q, r = np.divmod(local, stride)
    inner, last = r > 0, (r == 0) & (q > 0)
    doc_seq = group_seq0[group] + q
    cut_seq = np.concatenate([np.arange(n_seq, dtype=np.int64), doc_seq[inner], doc_seq[last] - 1])
    cut_group = np.concatenate([seq_group, group[inner], group[last]])
    cut_local = np.concatenate([window * stride, local[inner], local[last]])
    cut_place = np.concatenate([np.zeros(n_seq, dtype=np.int64), r[inner], np.full(int(last.sum()), stride)])
    by_place = np.argsort(cut_seq * capacity + cut_place, kind="stable")
    cut_seq, cut_group, cut_local = cut_seq[by_place], cut_group[by_place], cut_local[by_place]
    cut_flat = group_flat[cut_group] + cut_local
    # A sequence stops after `capacity` tokens or at its group's end, where padding follows.
    seq_stop = group_flat[cut_group] + np.minimum(
        (cut_seq - group_seq0[cut_group]) * stride + capacity, group_len[cut_group]
    )
    spans = (doc_len >= 2) & (local // stride != (local + doc_len - 2) // stride)
    n_tokens, split_docs = int(doc_len.sum()), int(np.count_nonzero(spans))
    return index_from_cuts(
        "aligned", capacity, n_seq, cut_seq, cut_flat, seq_stop, order, flat_begin, n_tokens, split_docs
    )


# ----------------------------------------------------------------------------------- length distribution


def length_thresholds(seq_len: int, short_doc_threshold: int = 0) -> list[int]:
    """The ladder plus the run's own lengths: how much of the mix fills a sequence, and how much is affected
    by up-sampling, are the two numbers a long-context stage is tuned by."""
    extra = {seq_len} | ({short_doc_threshold} if short_doc_threshold > 0 else set())
    return sorted(set(LENGTH_LADDER) | extra)


def at_least(lengths: np.ndarray, thresholds: Sequence[int]) -> dict[int, float]:
    """Share of the tokens that lie in documents of at least each threshold (0.0 for no tokens)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    return {int(t): (int(lengths[lengths >= t].sum()) / total if total else 0.0) for t in thresholds}


def summarize(lengths: np.ndarray, thresholds: Sequence[int]) -> dict[str, Any]:
    """Documents, tokens and the at-least shares of one set of documents."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return {
        "docs": len(lengths),
        "tokens": int(lengths.sum()),
        "at_least": at_least(lengths, thresholds),
    }


def mix(parts: Sequence[tuple[float, Mapping[int, float]]], thresholds: Sequence[int]) -> dict[int, float]:
    """The at-least shares of a mixture whose parts supply the given (unnormalised) token shares."""
    total = sum(weight for weight, _ in parts)
    return {
        int(t): (sum(weight * shares[t] for weight, shares in parts) / total if total else 0.0)
        for t in thresholds
    }


def length_distribution(
    sources: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    pools: Sequence[tuple[float, np.ndarray]],
    thresholds: Sequence[int],
    *,
    upsampling: tuple[int, float] | None,
    long_pool: bool,
) -> dict[str, Any]:
    """The length distribution of a mix, as data for the log, the trainer and tests.

    `sources` maps a name to (document lengths, kept mask, weight); `pools` lists (token share, document
    lengths) per pool. Per source, `before` covers all its documents and `after` its kept ones; `overall` mixes
    the sources by their normalised weights (each source's token share), so `overall.after` is what the source
    pools train; `trained` mixes the pools by their token shares, so it also counts the long pool (with none,
    it equals `overall.after`). Shares count document tokens, not the one-token overlaps of split pieces.
    """
    total_weight = sum(weight for _, _, weight in sources.values())
    described = {}
    for name, (lengths, kept, weight) in sources.items():
        lengths = np.asarray(lengths, dtype=np.int64)
        described[name] = {
            "weight": weight / total_weight,
            "before": summarize(lengths, thresholds),
            "after": summarize(lengths[np.asarray(kept, dtype=bool)], thresholds),
        }
    overall = {
        when: mix([(s["weight"], s[when]["at_least"]) for s in described.values()], thresholds)
        for when in ("before", "after")
    }
    return {
        "thresholds": [int(t) for t in thresholds],
        "upsampling": (
            {"short_doc_threshold": upsampling[0], "short_doc_keep": upsampling[1]} if upsampling else None
        ),
        "long_pool": long_pool,
        "sources": described,
        "overall": overall,
        "trained": mix([(share, at_least(lengths, thresholds)) for share, lengths in pools], thresholds),
    }


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _shares(shares: Mapping[int, float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in shares.values()) + " %"


def describe_distribution(distribution: Mapping[str, Any]) -> list[str]:
    """Log lines of `MixtureDataset.length_distribution()`: one per source, the weighted mix, and what the
    pools train when a long pool changes it."""
    thresholds = distribution["thresholds"]
    upsampling = distribution["upsampling"]
    header = (
        f"length mix: share of tokens in documents of >= {' / '.join(_tokens(t) for t in thresholds)} tokens"
    )
    if upsampling:
        header += (
            f", before -> after up-sampling (documents under {upsampling['short_doc_threshold']} tokens "
            f"kept with p={upsampling['short_doc_keep']:g})"
        )
    lines = [header]

    def line(label: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
        if not upsampling:
            return f"  {label}: {_shares(before['at_least'])} ({before['tokens']:,} tokens, {before['docs']:,} docs)"
        return (
            f"  {label}: {_shares(before['at_least'])} -> {_shares(after['at_least'])} ({before['tokens']:,} -> "
            f"{after['tokens']:,} tokens, {before['docs']:,} -> {after['docs']:,} docs)"
        )

    for name, source in distribution["sources"].items():
        lines.append(line(f"{name} (weight {source['weight']:.3f})", source["before"], source["after"]))
    overall = distribution["overall"]
    if upsampling:
        lines.append(f"  all sources by weight: {_shares(overall['before'])} -> {_shares(overall['after'])}")
    else:
        lines.append(f"  all sources by weight: {_shares(overall['before'])}")
    if distribution.get("long_pool"):
        lines.append(f"  as trained, long pool included: {_shares(distribution['trained'])}")
    return lines
