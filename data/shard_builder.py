"""One source's documents into shards: reuse what a valid shard on disk already holds, tokenize the rest.

Shard k of a split holds that split's documents [k * docs_per_shard, (k + 1) * docs_per_shard), so boundaries
depend only on document order. Each shard stores a digest of every document's text and encoding (with a BOS or
not), so a shard on disk (valid, same tokenizer) is matched document by document against the new stream: while
all match, nothing is tokenized; at the first difference (or a different count) the matching prefix's tokens are
copied from the old file into a new one and tokenizing starts from there. An unchanged shard is kept as it is
(same bytes, same mtime).

The builder sees every document of the source, but builds only the shards that `owned(split, index)` allows:
the others are counted and digested, never tokenized (a task of a `data.prepare` job array).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.config import DataPipelineConfig, SourceConfig
from data.log import get_logger
from data.manifest import shard_entry, split_summary
from data.shard_writer import ShardWriter
from data.shards import SPLITS, Shard, ShardError, documents_digest, open_shard, shard_path
from data.tokenize_pool import BATCH_CHARS, BATCH_DOCS, JOBS_IN_FLIGHT_PER_WORKER, Encoder
from data.tokenizer import TokenizerInfo

log = get_logger("data.prepare")


# Personalises the digest of documents encoded with a BOS (`data.add_bos`); without one it is the plain digest,
# as in shards written before documents had a BOS, so those stay reusable for `data.add_bos=false` only.
# The encoding scheme: special tokens spelled in the text are text (v2), with or without a BOS.
_PERSON = {True: b"v2:bos+text+eos", False: b"v2:text+eos"}


def text_digest(data: bytes, *, bos: bool) -> int:
    """A 64-bit digest of a document's UTF-8 text and of how it is encoded (the scheme, with a BOS or not),
    stored per document in its shard: a shard on disk is reused document by document only when the digests
    match, so a shard encoded another way is never taken for this run's."""
    person = _PERSON[bos]
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "little")


@dataclass
class _ShardPlan:
    """One shard being assembled: matched against the valid shard on disk, tokenized, or (not ours) counted."""

    split: str
    index: int
    path: Path
    build: bool = True  # False: another task builds this shard; its documents are only counted and digested
    existing: Shard | None = None  # while every document so far matches this shard's, nothing is tokenized
    existing_digests: np.ndarray | None = None
    writer: ShardWriter | None = None
    n_docs: int = 0
    digests: list[int] = field(default_factory=list)  # of every document of the shard, in order
    batch: list[str] = field(default_factory=list)
    batch_digests: list[int] = field(default_factory=list)
    batch_chars: int = 0


@dataclass
class _Job:
    texts: list[str]
    digests: list[int]
    plan: _ShardPlan
    closes_shard: bool


class SourceBuilder:
    """Routes one source's documents into shard plans and turns completed tokenizer jobs into shards; builds
    the shards that `owned(split, index)` allows (all by default)."""

    def __init__(
        self,
        cfg: DataPipelineConfig,
        source: SourceConfig,
        info: TokenizerInfo,
        encoder: Encoder,
        owned: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.info = info
        self.encoder = encoder
        self.owned = owned
        self.out_dir = Path(cfg.data.shards_dir) / source.name
        self.docs_per_shard = cfg.data.docs_per_shard
        self.doc_counts = dict.fromkeys(SPLITS, 0)
        self.plans: dict[str, _ShardPlan | None] = dict.fromkeys(SPLITS)
        self.entries: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SPLITS}
        # `documents_digest` of every shard of each split, built here or not, in order.
        self.shard_digests: dict[str, list[str]] = {s: [] for s in SPLITS}
        self.pending: deque[tuple[cf.Future, _Job]] = deque()
        self.max_pending = JOBS_IN_FLIGHT_PER_WORKER * encoder.workers + 1
        self.tokenized_tokens = 0
        self.reused_shards = 0
        self.built_shards = 0
        self.skipped_shards = 0
        self.copied_docs = 0
        self.docs_done = 0

    def add(self, split: str, text: str, digest: int) -> None:
        plan = self.plans[split]
        if plan is None:
            index = self.doc_counts[split] // self.docs_per_shard
            plan = self.plans[split] = self._new_plan(split, index)
        self.doc_counts[split] += 1
        position = plan.n_docs
        plan.n_docs += 1
        plan.digests.append(digest)
        if not plan.build:
            self.docs_done += 1
        elif plan.existing is not None:
            digests = plan.existing_digests
            assert digests is not None
            if position < len(digests) and digests[position] == digest != 0:
                self.docs_done += 1
            else:
                self._diverge(plan, position)
                self._add_to_batch(plan, text, digest)
        else:
            self._add_to_batch(plan, text, digest)
        if plan.n_docs == self.docs_per_shard:
            self._finish(plan)

    def finish(self) -> None:
        for plan in self.plans.values():
            if plan is not None:
                self._finish(plan)
        while self.pending:
            self._complete_oldest()

    def _new_plan(self, split: str, index: int) -> _ShardPlan:
        plan = _ShardPlan(split, index, shard_path(self.cfg.data.shards_dir, self.source.name, split, index))
        plan.build = self.owned is None or self.owned(split, index)
        if not plan.build:
            return plan
        if plan.path.exists():
            try:
                shard = open_shard(plan.path, expected_fingerprint=self.info.fingerprint)
                if shard.vocab_size != self.info.vocab_size:
                    raise ShardError(f"{plan.path}: vocab size {shard.vocab_size} != {self.info.vocab_size}")
                plan.existing, plan.existing_digests = shard, shard.doc_digests()
                return plan
            except ShardError as error:
                log.info("rebuilding %s", error)
        plan.writer = self._writer(plan)
        return plan

    def _writer(self, plan: _ShardPlan) -> ShardWriter:
        return ShardWriter(plan.path, vocab_size=self.info.vocab_size, fingerprint=self.info.fingerprint)

    def _diverge(self, plan: _ShardPlan, n_same: int) -> None:
        """The stream differs from the shard on disk after `n_same` documents: keep those, tokenize the rest."""
        old, digests = plan.existing, plan.existing_digests
        assert old is not None and digests is not None
        plan.existing = plan.existing_digests = None
        plan.writer = self._writer(plan)
        if n_same:
            end = int(old.doc_offsets[n_same])
            plan.writer.add(old.tokens[:end], old.doc_lengths()[:n_same], digests[:n_same])
            self.copied_docs += n_same
        log.info("%s: the documents changed after %d of them; re-tokenizing from there", plan.path, n_same)

    def _add_to_batch(self, plan: _ShardPlan, text: str, digest: int) -> None:
        plan.batch.append(text)
        plan.batch_digests.append(digest)
        plan.batch_chars += len(text)
        if plan.batch_chars >= BATCH_CHARS or len(plan.batch) >= BATCH_DOCS:
            self._submit(plan, closes_shard=False)

    def _submit(self, plan: _ShardPlan, *, closes_shard: bool) -> None:
        job = _Job(plan.batch, plan.batch_digests, plan, closes_shard)
        plan.batch, plan.batch_digests, plan.batch_chars = [], [], 0
        self.pending.append((self.encoder.submit(job.texts), job))
        while len(self.pending) > self.max_pending:
            self._complete_oldest()

    def _finish(self, plan: _ShardPlan) -> None:
        """The shard has all its documents: keep the file on disk if it holds exactly them, else close."""
        self.plans[plan.split] = None
        self.shard_digests[plan.split].append(documents_digest(plan.digests))
        if not plan.build:
            self.skipped_shards += 1
            return
        if plan.existing is not None:
            if plan.n_docs == plan.existing.n_docs:
                self.entries[plan.split][plan.index] = shard_entry(plan.existing)
                self.reused_shards += 1
                return
            self._diverge(plan, plan.n_docs)
        self._submit(plan, closes_shard=True)

    def _complete_oldest(self) -> None:
        future, job = self.pending.popleft()
        tokens, lengths = future.result()
        plan = job.plan
        assert plan.writer is not None
        plan.writer.add(tokens, lengths, job.digests)
        self.tokenized_tokens += len(tokens)
        self.docs_done += len(lengths)
        if job.closes_shard:
            stats = plan.writer.close()
            self.entries[plan.split][plan.index] = shard_entry(stats)
            self.built_shards += 1

    def abort(self) -> None:
        """Drop temporary files of shards not yet committed (committed shards stay, for the next run)."""
        for _, job in self.pending:
            if job.plan.writer is not None:
                job.plan.writer.abort()
        for plan in self.plans.values():
            if plan is not None and plan.writer is not None:
                plan.writer.abort()

    def split_summary(self, split: str) -> dict[str, Any]:
        """The manifest's entry for one split; every shard of it must have been built here."""
        return split_summary(self.out_dir, split, self.entries[split])
