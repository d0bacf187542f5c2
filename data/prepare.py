"""Tokenize every source into validated shards: `python -m data.prepare data=... tokenizer=...`.

The main process reads and validates documents (`data.sources`), assigns each to "train" or "val" by a stable
hash of (source, ordinal), and hands batches of texts to a pool of tokenizer processes, one per core, each
running HF `tokenizers` single-threaded. A bounded number of batches is in flight, so reading overlaps with
tokenizing and memory stays flat however large the corpus is; results come back in submission order and are
streamed into shards (`data.shards.ShardWriter`). A process pool was measured against Rust threads
(`encode_batch_fast` over all cores in one process) on 2 cores: the same speed within noise there, but the pool
also spreads the id-list-to-numpy conversion over the cores, which a single process cannot.

Shard k of a split holds that split's documents [k * docs_per_shard, (k + 1) * docs_per_shard), so boundaries
depend only on document order. A re-run reads the sources again but tokenizes nothing that a valid shard on
disk, made with the same tokenizer, already holds: each shard stores a digest of every document's text, so an
unchanged shard is kept as it is (same bytes, same mtime) and a changed one keeps the tokens of its unchanged
leading documents. An interrupted run resumes, and an unchanged corpus costs one read. The manifest is written
last, atomically; until it exists the source counts as not prepared.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fcntl
import hashlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tokenizers import Tokenizer

from data.cli import typed_data_config
from data.config import DataPipelineConfig, SourceConfig
from data.log import get_logger, progress_enabled
from data.shards import (
    SPLITS,
    Shard,
    ShardError,
    ShardWriter,
    atomic_write_json,
    manifest_path,
    open_shard,
    read_manifest,
    shard_name,
    shard_path,
    token_dtype,
)
from data.sources import RejectLog, iter_documents
from data.tokenizer import TokenizerInfo, load_tokenizer

log = get_logger("data.prepare")  # not __name__: it is "__main__" under `python -m`

MANIFEST_FORMAT = 1
# Texts per tokenizer job: large enough to amortise inter-process transfer, small enough to keep all workers
# busy and memory flat (256 KiB - 4 MiB measured alike on 2 cores).
BATCH_CHARS = 1 << 20
BATCH_DOCS = 2048
JOBS_IN_FLIGHT_PER_WORKER = 2


def split_of(source: str, ordinal: int, val_fraction: float) -> str:
    """The split of a document, from a stable hash of (source, ordinal): the same on every run and machine
    (never Python's `hash()`, which is salted per process)."""
    digest = hashlib.blake2b(f"{source}\x00{ordinal}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else "train"


# ----------------------------------------------------------------------------------------------- tokenizing


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` back to back, each followed by EOS, and the length of each (EOS included)."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for doc_ids in ids:
        start, end = end, end + len(doc_ids) + 1
        tokens[start : end - 1] = doc_ids
        tokens[end - 1] = eos_id
    return tokens, lengths


_worker: tuple[Tokenizer, int, np.dtype] | None = None


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    # One thread per process: the pool is the parallelism, and Rust threads would oversubscribe the cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    _worker = (Tokenizer.from_str(tokenizer_json), eos_id, np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None, "tokenizer worker was not initialised"
    tokenizer, eos_id, dtype = _worker
    return encode_documents(tokenizer, texts, eos_id, dtype)


def _start_method() -> str:
    """Fork where the platform has it: "spawn" re-imports the caller's main module in every worker, which
    under `python -m pretrain` means importing torch (a second and 200+ MB) per core. With fork the pool starts
    all workers at once on first use, before its own threads exist; each worker builds its own tokenizer and
    runs it single-threaded (HF tokenizers also turns its Rust thread pool off in forked children)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class Encoder:
    """Tokenizes batches of texts asynchronously: a process pool of `workers`, or inline when workers == 1."""

    def __init__(self, tokenizer: Tokenizer, info: TokenizerInfo, workers: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = info.eos_id
        self.dtype = token_dtype(info.vocab_size)
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = cf.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(_start_method()),
                initializer=_init_worker,
                initargs=(tokenizer.to_str(), info.eos_id, self.dtype.str),
            )

    def submit(self, texts: list[str]) -> cf.Future:
        if self._pool is not None and texts:
            return self._pool.submit(_encode_in_worker, texts)
        future: cf.Future = cf.Future()
        future.set_result(encode_documents(self.tokenizer, texts, self.eos_id, self.dtype))
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------------------------- one shard


@dataclass
class _ShardPlan:
    """One shard being assembled: matched against the valid shard on disk, or being tokenized."""

    split: str
    index: int
    path: Path
    existing: Shard | None = None  # while every document so far matches this shard's, nothing is tokenized
    existing_digests: np.ndarray | None = None
    writer: ShardWriter | None = None
    n_docs: int = 0
    batch: list[str] = field(default_factory=list)
    batch_digests: list[int] = field(default_factory=list)
    batch_chars: int = 0


@dataclass
class _Job:
    texts: list[str]
    digests: list[int]
    plan: _ShardPlan
    closes_shard: bool


def text_digest(data: bytes) -> int:
    """A 64-bit digest of a document's UTF-8 text, stored per document in its shard."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class _SourceBuilder:
    """Routes one source's documents into shard plans and turns completed tokenizer jobs into shards.

    A shard already on disk (valid, same tokenizer) is matched document by document against the new stream by
    text digest; while all match, nothing is tokenized. At the first difference (or a different count), the
    matching prefix's tokens are copied from the old file into a new one and tokenizing starts from there.
    """

    def __init__(self, cfg: DataPipelineConfig, source: SourceConfig, info: TokenizerInfo, encoder: Encoder):
        self.cfg = cfg
        self.source = source
        self.info = info
        self.encoder = encoder
        self.out_dir = Path(cfg.data.shards_dir) / source.name
        self.docs_per_shard = cfg.data.docs_per_shard
        self.doc_counts = dict.fromkeys(SPLITS, 0)
        self.plans: dict[str, _ShardPlan | None] = dict.fromkeys(SPLITS)
        self.entries: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SPLITS}
        self.pending: deque[tuple[cf.Future, _Job]] = deque()
        self.max_pending = JOBS_IN_FLIGHT_PER_WORKER * encoder.workers + 1
        self.tokenized_tokens = 0
        self.reused_shards = 0
        self.built_shards = 0
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
        if plan.existing is not None:
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
        if plan.existing is not None:
            if plan.n_docs == plan.existing.n_docs:
                self.entries[plan.split][plan.index] = {
                    "file": plan.path.name,
                    "docs": plan.existing.n_docs,
                    "tokens": plan.existing.n_tokens,
                    "checksum": plan.existing.checksum,
                }
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
            self.entries[plan.split][plan.index] = stats.manifest_entry()
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
        entries = [self.entries[split][i] for i in sorted(self.entries[split])]
        if [e["file"] for e in entries] != [shard_name(split, i) for i in range(len(entries))]:
            raise RuntimeError(f"{self.out_dir}: shards of split {split} are not contiguous: {entries}")
        return {
            "docs": sum(e["docs"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "shards": entries,
        }


# ----------------------------------------------------------------------------------------------- one source


def source_config_key(cfg: DataPipelineConfig, source: SourceConfig) -> dict[str, Any]:
    """What decides a source's shards besides the tokenizer (the mixture weight does not)."""
    described = dataclasses.asdict(source)
    described.pop("weight", None)
    return {
        "source": described,
        "docs_per_shard": cfg.data.docs_per_shard,
        "val_fraction": cfg.data.val_fraction,
        "max_doc_chars": cfg.data.max_doc_chars,
    }


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the source's directory, so two prepares of one source take turns."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        with suppress(OSError):  # file systems without flock: run unlocked
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_leftovers(directory: Path, keep: set[str]) -> None:
    """Temporary files of an interrupted run, and shards that the new manifest no longer lists."""
    for path in directory.iterdir():
        name = path.name
        is_temp = name.startswith(".") and (".tmp" in name) and name != ".lock"
        is_stale_shard = name.endswith(".bin") and name.split("-")[0] in SPLITS and name not in keep
        if is_temp or is_stale_shard:
            path.unlink(missing_ok=True)


def prepare_source(
    cfg: DataPipelineConfig, source: SourceConfig, info: TokenizerInfo, encoder: Encoder
) -> dict[str, Any]:
    """Shard one source and commit its manifest; returns the manifest."""
    from tqdm import tqdm

    out_dir = Path(cfg.data.shards_dir) / source.name
    with _locked(out_dir):
        _remove_leftovers(out_dir, keep={p.name for p in out_dir.glob("*.bin")})
        start = time.perf_counter()
        builder = _SourceBuilder(cfg, source, info, encoder)
        rejects = RejectLog(out_dir / "rejects.jsonl")
        bar = tqdm(desc=f"prepare {source.name}", unit="doc", disable=not progress_enabled())
        try:
            documents = iter_documents(
                source, max_doc_chars=cfg.data.max_doc_chars, streaming=cfg.data.streaming, rejects=rejects
            )
            for doc in documents:
                try:
                    digest = text_digest(doc.text.encode("utf-8"))
                except UnicodeEncodeError as error:  # lone surrogates: the tokenizer cannot take them
                    rejects.add(source.name, doc.location, "invalid_utf8", str(error))
                    continue
                builder.add(split_of(source.name, doc.ordinal, cfg.data.val_fraction), doc.text, digest)
                if builder.docs_done > bar.n:
                    bar.update(builder.docs_done - bar.n)
            builder.finish()
            bar.update(builder.docs_done - bar.n)
        except BaseException:
            builder.abort()
            raise
        finally:
            rejects.close()
            bar.close()
        seconds = time.perf_counter() - start
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": source.name,
            "data": cfg.data.name,
            "tokenizer_fingerprint": info.fingerprint,
            "tokenizer_dir": str(info.dir),
            "vocab_size": info.vocab_size,
            "eos_id": info.eos_id,
            "dtype": token_dtype(info.vocab_size).name,
            "splits": {split: builder.split_summary(split) for split in SPLITS},
            "rejects": rejects.summary(),
            "config": source_config_key(cfg, source),
        }
        atomic_write_json(manifest_path(cfg.data.shards_dir, source.name), manifest)
        listed = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
        _remove_leftovers(out_dir, keep=listed)
    splits = manifest["splits"]
    if not splits["train"]["docs"]:
        log.warning(
            "source %s has no training documents (%d rejects); check its config", source.name, rejects.total
        )
    log.info(
        "source %s: %d docs (train %d, val %d), %d tokens, %d rejects; %d shards reused, %d built "
        "(%d docs' tokens kept from older shards); tokenized %d tokens at %.0f tokens/s (%.1f s)",
        source.name,
        splits["train"]["docs"] + splits["val"]["docs"],
        splits["train"]["docs"],
        splits["val"]["docs"],
        splits["train"]["tokens"] + splits["val"]["tokens"],
        rejects.total,
        builder.reused_shards,
        builder.built_shards,
        builder.copied_docs,
        builder.tokenized_tokens,
        builder.tokenized_tokens / max(seconds, 1e-9),
        seconds,
    )
    return manifest


# ----------------------------------------------------------------------------------------------- entry points


def prepare(cfg: DataPipelineConfig) -> dict[str, dict]:
    """Tokenize every source of `cfg.data` into shards; returns {source name: manifest}."""
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    workers = cfg.data.workers()
    log.info(
        "preparing %s with tokenizer %s (fingerprint %s) on %d worker(s) -> %s",
        cfg.data.name,
        info.dir,
        info.fingerprint[:12],
        workers,
        cfg.data.shards_dir,
    )
    encoder = Encoder(tokenizer, info, workers)
    try:
        return {
            source.name: prepare_source(cfg, source, info, encoder) for source in cfg.data.sources.values()
        }
    finally:
        encoder.close()


def why_prepare(cfg: DataPipelineConfig, fingerprint: str) -> str | None:
    """Why the shards must be (re)built, or None when every manifest is complete and matches the config."""
    for source in cfg.data.sources.values():
        try:
            manifest = read_manifest(cfg.data.shards_dir, source.name)
        except ShardError as error:
            return str(error).split(";")[0]
        where = manifest_path(cfg.data.shards_dir, source.name)
        if manifest.get("format") != MANIFEST_FORMAT:
            return f"{where} has manifest format {manifest.get('format')}, this code writes {MANIFEST_FORMAT}"
        if manifest["tokenizer_fingerprint"] != fingerprint:
            return f"{where} was made with another tokenizer ({manifest['tokenizer_fingerprint'][:12]})"
        if manifest.get("config") != source_config_key(cfg, source):
            return f"{where} was made with another source config ({manifest.get('config')})"
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                if not (where.parent / entry["file"]).is_file():
                    return f"{where.parent / entry['file']} is missing"
    return None


def ensure_shards(cfg: DataPipelineConfig) -> None:
    """Cheap when every source's manifest exists and matches the tokenizer and config; else run `prepare`.

    Needs the tokenizer (`data.tokenizer.ensure_tokenizer` first). Call it from one process (rank 0) and let the
    others wait at a barrier: two prepares of one source take turns on a file lock, but do the work twice.
    """
    _, info = load_tokenizer(cfg.tokenizer.dir)
    reason = why_prepare(cfg, info.fingerprint)
    if reason is None:
        log.info("shards in %s are up to date (tokenizer %s)", cfg.data.shards_dir, info.fingerprint[:12])
        return
    log.info("preparing shards: %s", reason)
    prepare(cfg)


@hydra.main(config_path="../conf", config_name="data_pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Tokenize and shard every source (completed shards of an earlier run are reused)."""
    config = typed_data_config(cfg)
    manifests = prepare(config)
    total = sum(m["splits"][s]["tokens"] for m in manifests.values() for s in SPLITS)
    log.info(
        "prepared %s: %d tokens from %d sources in %s",
        config.data.name,
        total,
        len(manifests),
        config.data.shards_dir,
    )


if __name__ == "__main__":
    main()
