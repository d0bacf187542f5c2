"""Tokenize every source into validated shards: `python -m data.prepare data=... tokenizer=...`.

The main process reads and validates documents (`data.sources`), assigns each to "train" or "val" by a stable
hash of (source, ordinal), and hands batches of texts to a pool of tokenizer processes, one per core, each
running HF `tokenizers` single-threaded (`data.tokenize_pool`). A bounded number of batches is in flight, so
reading overlaps with tokenizing and memory stays flat however large the corpus is; results come back in
submission order and are streamed into shards (`data.shard_builder`).

Shard k of a split holds that split's documents [k * docs_per_shard, (k + 1) * docs_per_shard), so boundaries
depend only on document order. A re-run reads the sources again but tokenizes nothing that a valid shard on
disk, made with the same tokenizer, already holds (each shard stores a digest of every document's text). An
interrupted run resumes, and an unchanged corpus costs one read. The manifest is written last, atomically;
until it exists the source counts as not prepared.

On a cluster the same command runs as a job array (slurm/prepare.sh, `data.prepare_tasks`): with
`prepare.task_index=i prepare.num_tasks=n` a task builds only the shards k with k % n == i and no manifest;
then `prepare.merge=true prepare.num_tasks=n` checks every shard and writes the manifests, identical to those of
a single-process run. Re-running a task or the merge redoes nothing that is already done.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from data.cli import one_line_errors, typed_data_config
from data.config import ConfigError, DataPipelineConfig, PrepareConfig, SourceConfig
from data.log import get_logger, progress_enabled
from data.manifest import read_manifest, source_manifest, why_stale, write_manifest
from data.prepare_tasks import (
    REJECTS_NAME,
    is_task_file,
    merged_manifest,
    shard_owner,
    task_lock_path,
    task_record_path,
    what_was_read,
    write_task_record,
)
from data.rejects import RejectLog
from data.shard_builder import SourceBuilder, text_digest
from data.shards import SPLITS, ShardError
from data.sources import iter_documents
from data.tokenize_pool import Encoder
from data.tokenizer import TokenizerError, TokenizerInfo, ensure_tokenizer, load_tokenizer

log = get_logger("data.prepare")  # not __name__: it is "__main__" under `python -m`

_SHARD_FILE = re.compile(r"(train|val)-(\d+)\.bin")


def split_of(source: str, ordinal: int, val_fraction: float) -> str:
    """The split of a document, from a stable hash of (source, ordinal): the same on every run and machine
    (never Python's `hash()`, which is salted per process)."""
    digest = hashlib.blake2b(f"{source}\x00{ordinal}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else "train"


# ----------------------------------------------------------------------------------------------- locks, leftovers


@contextmanager
def _locked(directory: Path, task: PrepareConfig | None = None) -> Iterator[None]:
    """A whole run (single-process prepare or merge) holds the source's `.lock` exclusively, so such runs take
    turns, with each other and with job-array tasks. A task holds `.lock` shared, so the tasks of an array run
    side by side, plus its own task lock exclusively, so a task started twice takes turns with itself."""
    directory.mkdir(parents=True, exist_ok=True)
    locks = [(directory / ".lock", fcntl.LOCK_EX if task is None else fcntl.LOCK_SH)]
    if task is not None:
        locks.append((task_lock_path(directory, task.task_index), fcntl.LOCK_EX))
    with ExitStack() as stack:
        for path, mode in locks:
            lock = stack.enter_context(open(path, "a"))
            with suppress(OSError):  # file systems without flock: run unlocked
                fcntl.flock(lock, mode)
        yield


def _temp_target(name: str) -> str | None:
    """The file a temporary file was to become: `.<target>.<random>.tmp` (shards, json) or
    `.<target>.tmp-<random>` (the rejects list); None for any other name."""
    if not name.startswith("."):
        return None
    if ".tmp-" in name:
        return name[1:].rsplit(".tmp-", 1)[0]
    if ".tmp" in name:
        return name[1:].split(".tmp", 1)[0].rsplit(".", 1)[0]
    return None


def _remove_leftovers(directory: Path, keep: set[str]) -> None:
    """For a whole run, under the exclusive lock: temporary files of interrupted runs, and shards, task records
    and task locks that are not in `keep` (no task can be running, so none of this is in use)."""
    for path in directory.iterdir():
        name = path.name
        stale = name not in keep and (_SHARD_FILE.fullmatch(name) is not None or is_task_file(name))
        if _temp_target(name) is not None or stale:
            path.unlink(missing_ok=True)


def _owned_by(task: PrepareConfig, name: str) -> bool:
    """Whether task `task` writes the file `name` (one of its shards, its record, or the rejects list)."""
    shard = _SHARD_FILE.fullmatch(name)
    if shard is not None:
        return shard_owner(int(shard.group(2)), task.num_tasks) == task.task_index
    if name == REJECTS_NAME:
        return task.task_index == 0
    return name == task_record_path(Path(), task.task_index, task.num_tasks).name


def _shard_filter(task: PrepareConfig) -> Callable[[str, int], bool] | None:
    """Which shards a run builds: a job-array task its own, a whole run (None) every one."""
    if not task.is_slice:
        return None
    return lambda split, index: shard_owner(index, task.num_tasks) == task.task_index


def _remove_own_temp_files(directory: Path, task: PrepareConfig) -> None:
    """Temporary files that an interrupted run of this same task left; other tasks' files are theirs."""
    for path in directory.iterdir():
        target = _temp_target(path.name)
        if target is not None and _owned_by(task, target):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- one source


def _build(cfg: DataPipelineConfig, source: SourceConfig, builder: SourceBuilder, rejects: RejectLog) -> None:
    """Read every document of the source in order into `builder`, rejecting what cannot be tokenized."""
    from tqdm import tqdm

    bar = tqdm(desc=f"prepare {source.name}", unit="doc", disable=not progress_enabled())
    try:
        documents = iter_documents(
            source, max_doc_chars=cfg.data.max_doc_chars, streaming=cfg.data.streaming, rejects=rejects
        )
        for doc in documents:
            try:
                digest = text_digest(doc.text.encode("utf-8"), bos=cfg.data.add_bos)
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
        bar.close()


def prepare_source(
    cfg: DataPipelineConfig, source: SourceConfig, info: TokenizerInfo, encoder: Encoder
) -> dict[str, Any]:
    """Shard one source. A whole run commits the manifest and returns it; a task of a job array
    (`cfg.prepare.is_slice`) builds only its own shards, commits its task record and returns that."""
    task = cfg.prepare
    out_dir = Path(cfg.data.shards_dir) / source.name
    # Every task reads the whole source (see data.prepare_tasks); task 0 alone lists the rejects.
    writes_rejects = not task.is_slice or task.task_index == 0
    with _locked(out_dir, task if task.is_slice else None):
        if task.is_slice:
            _remove_own_temp_files(out_dir, task)
        else:
            _remove_leftovers(out_dir, keep={p.name for p in out_dir.glob("*.bin")})
        start = time.perf_counter()
        builder = SourceBuilder(cfg, source, info, encoder, owned=_shard_filter(task))
        rejects = RejectLog(out_dir / REJECTS_NAME if writes_rejects else None)
        try:
            _build(cfg, source, builder, rejects)
        finally:
            if writes_rejects:
                rejects.close()
        seconds = time.perf_counter() - start
        if task.is_slice:
            read = what_was_read(
                cfg, source, info, builder.doc_counts, builder.shard_digests, rejects.summary()
            )
            built = sorted(e["file"] for split in SPLITS for e in builder.entries[split].values())
            result = write_task_record(out_dir, task, read, built)
        else:
            splits = {split: builder.split_summary(split) for split in SPLITS}
            result = source_manifest(cfg, source, info, splits, rejects.summary())
            write_manifest(cfg.data.shards_dir, source.name, result)
            _remove_leftovers(out_dir, keep={e["file"] for s in splits.values() for e in s["shards"]})
    _log_source(cfg, source, builder, rejects, seconds)
    return result


def _log_source(
    cfg: DataPipelineConfig, source: SourceConfig, builder: SourceBuilder, rejects: RejectLog, seconds: float
) -> None:
    counts = builder.doc_counts
    shards = [e for split in SPLITS for e in builder.entries[split].values()]
    if not counts["train"]:
        log.warning(
            "source %s has no training documents (%d rejects); check its config", source.name, rejects.total
        )
    task = cfg.prepare
    who, others = f"source {source.name}", ""
    if task.is_slice:
        who += f", task {task.task_index} of {task.num_tasks}"
        others = f", {builder.skipped_shards} left to other tasks"
    log.info(
        "%s: %d docs (train %d, val %d), %d rejects, %d tokens in %d shards: %d reused, %d built (%d docs' "
        "tokens kept from older shards)%s; tokenized %d tokens at %.0f tokens/s (%.1f s)",
        who,
        counts["train"] + counts["val"],
        counts["train"],
        counts["val"],
        rejects.total,
        sum(e["tokens"] for e in shards),
        len(shards),
        builder.reused_shards,
        builder.built_shards,
        builder.copied_docs,
        others,
        builder.tokenized_tokens,
        builder.tokenized_tokens / max(seconds, 1e-9),
        seconds,
    )


def merge_source(cfg: DataPipelineConfig, source: SourceConfig, info: TokenizerInfo) -> dict[str, Any]:
    """After every task of a job array: check all of one source's shards, commit its manifest, clean up."""
    num_tasks = cfg.prepare.num_tasks
    out_dir = Path(cfg.data.shards_dir) / source.name
    with _locked(out_dir):
        if num_tasks == 1:  # the one task was a whole prepare and wrote the manifest itself
            reason = why_stale(cfg, source, info.fingerprint)
            if reason is not None:
                raise ShardError(
                    f"nothing to merge with prepare.num_tasks=1: {reason}; run the prepare first"
                )
            return read_manifest(cfg.data.shards_dir, source.name)
        manifest = merged_manifest(cfg, source, info)
        write_manifest(cfg.data.shards_dir, source.name, manifest)
        records = {task_record_path(out_dir, i, num_tasks).name for i in range(num_tasks)}
        listed = {e["file"] for split in manifest["splits"].values() for e in split["shards"]}
        _remove_leftovers(out_dir, keep=listed | records)  # records stay, so the merge can run again
    splits = manifest["splits"]
    log.info(
        "source %s: merged %d tasks: %d docs (train %d, val %d), %d tokens in %d shards, %d rejects",
        source.name,
        num_tasks,
        splits["train"]["docs"] + splits["val"]["docs"],
        splits["train"]["docs"],
        splits["val"]["docs"],
        splits["train"]["tokens"] + splits["val"]["tokens"],
        len(listed),
        manifest["rejects"]["total"],
    )
    return manifest


# ----------------------------------------------------------------------------------------------- entry points


def prepare(cfg: DataPipelineConfig) -> dict[str, dict]:
    """Tokenize every source of `cfg.data` into shards; returns {source name: manifest}.

    As task i of n of a job array (`cfg.prepare`) it builds only that task's shards and returns
    {source name: task record}; with `prepare.merge` it tokenizes nothing, checks every task's shards and
    returns (and writes) the manifests.
    """
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    task = cfg.prepare
    if task.merge:
        log.info(
            "merging the %d prepare tasks of %s in %s", task.num_tasks, cfg.data.name, cfg.data.shards_dir
        )
        return {source.name: merge_source(cfg, source, info) for source in cfg.data.sources.values()}
    workers = cfg.data.workers()
    log.info(
        "preparing %s%s with tokenizer %s (fingerprint %s) on %d worker(s) -> %s",
        cfg.data.name,
        f" (task {task.task_index} of {task.num_tasks})" if task.is_slice else "",
        info.dir,
        info.fingerprint[:12],
        workers,
        cfg.data.shards_dir,
    )
    encoder = Encoder(tokenizer, info, workers, add_bos=cfg.data.add_bos)
    try:
        return {
            source.name: prepare_source(cfg, source, info, encoder) for source in cfg.data.sources.values()
        }
    finally:
        encoder.close()


def why_prepare(cfg: DataPipelineConfig, fingerprint: str) -> str | None:
    """Why the shards must be (re)built, or None when every manifest is complete and matches the config."""
    for source in cfg.data.sources.values():
        reason = why_stale(cfg, source, fingerprint)
        if reason is not None:
            return reason
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


def ensure_data(cfg: DataPipelineConfig) -> None:
    """Every missing stage before training: the tokenizer, then the shards; both reused when up to date."""
    ensure_tokenizer(cfg)
    ensure_shards(cfg)


# What a user fixes by changing the command, the config or the files: one line, no traceback.
USER_ERRORS = (ConfigError, TokenizerError, ShardError, FileNotFoundError)


@hydra.main(config_path="../conf", config_name="data_pipeline", version_base="1.3")
@one_line_errors(*USER_ERRORS)
def main(cfg: DictConfig) -> None:
    """Tokenize and shard every source (completed shards of an earlier run are reused)."""
    config = typed_data_config(cfg)
    results = prepare(config)
    if config.prepare.is_slice:
        log.info(
            "task %d of %d of %s done; run the merge (prepare.merge=true prepare.num_tasks=%d) after every task",
            config.prepare.task_index,
            config.prepare.num_tasks,
            config.data.name,
            config.prepare.num_tasks,
        )
        return
    total = sum(m["splits"][s]["tokens"] for m in results.values() for s in SPLITS)
    log.info(
        "prepared %s: %d tokens from %d sources in %s",
        config.data.name,
        total,
        len(results),
        config.data.shards_dir,
    )


if __name__ == "__main__":
    main()
