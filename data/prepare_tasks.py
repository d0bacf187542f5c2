"""`data.prepare` as a job array: which task builds which shard, what a task leaves behind, and the merge.

Task i of n builds every shard k (of each split of each source) with k % n == i. Every task still reads and
validates the whole source in order, and tokenizes only its own shards. That is what keeps the shards identical
to a single-process run: shard k holds a split's documents [k * docs_per_shard, (k + 1) * docs_per_shard),
counted after rejects and after the train/val split, so where a shard starts is known only by reading
everything before it. Cutting the input files into ranges instead would make the boundaries depend on the
number of tasks (or need a counting pass first). Reading is the cheap part; tokenizing is what gets divided:
on a 44 MB JSONL here, reading, validating and digesting took 0.45 s of a 6.3 s one-worker prepare, and each of
4 tasks took 2.0 s.

A task commits its shards under their final names (atomically, as a single-process run does), then its task
record `.prepare-task-<i>-of-<n>.json`: what it read (per split, the document count and the digest of every
shard's document texts; the rejects summary), with which tokenizer and config. Every task sees every reject, so
task 0 alone writes the rejects list (`rejects.jsonl`, under its final name); the others only count (and the
merge checks that the list is as long as every task counted). No task writes the manifest: only the merge does,
once every shard is checked. Tasks share the source's lock and each holds its own, so they run side by side and
touch only their own files; the merge, like a single-process prepare, holds the lock alone.

The merge tokenizes and reads no source. It needs every task's record, and they must agree with each other and
with the merge's own config; then it opens every shard (header, checksum, tokenizer) and checks that it holds
exactly the documents the tasks read (the header's digest of its documents' digests). It then writes the
manifest a single-process run would have written, byte for byte, and removes temporary files, shards no longer
listed and other task counts' records. The records stay: re-running a task reuses its shards and rewrites the
same record, and re-running the merge writes the same manifest again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NoReturn

from data.atomic_io import atomic_write_json
from data.config import DataPipelineConfig, PrepareConfig, SourceConfig
from data.manifest import shard_entry, source_config_key, source_manifest, split_summary
from data.shards import SPLITS, ShardError, open_shard, shard_name
from data.tokenizer import TokenizerInfo

TASK_RECORD_FORMAT = 1
REJECTS_NAME = "rejects.jsonl"
_TASK_FILE = re.compile(r"\.prepare-task-\d+(-of-\d+\.json|\.lock)")


def shard_owner(index: int, num_tasks: int) -> int:
    """The task of a job array that builds shard `index` (of any split of any source)."""
    return index % num_tasks


def task_record_path(out_dir: Path, task_index: int, num_tasks: int) -> Path:
    return out_dir / f".prepare-task-{task_index}-of-{num_tasks}.json"


def task_lock_path(out_dir: Path, task_index: int) -> Path:
    return out_dir / f".prepare-task-{task_index}.lock"


def is_task_file(name: str) -> bool:
    """A task record or a task's lock file."""
    return _TASK_FILE.fullmatch(name) is not None


def _rerun_hint(tasks: list[int], num_tasks: int) -> str:
    which = ", ".join(map(str, tasks))
    return (
        f"re-run task(s) {which} (`python -m data.prepare <the same overrides> ++prepare.task_index=<i> "
        f"++prepare.num_tasks={num_tasks}`), then the merge"
    )


# ----------------------------------------------------------------------------------------------- task records


def what_was_read(
    cfg: DataPipelineConfig,
    source: SourceConfig,
    info: TokenizerInfo,
    doc_counts: dict[str, int],
    shard_digests: dict[str, list[str]],
    rejects: dict[str, Any],
) -> dict[str, Any]:
    """The part of a task record that every task of one array must have in common."""
    return {
        "tokenizer_fingerprint": info.fingerprint,
        "config": source_config_key(cfg, source),
        "rejects": rejects,
        "splits": {s: {"docs": doc_counts[s], "shard_digests": shard_digests[s]} for s in SPLITS},
    }


def write_task_record(
    out_dir: Path, task: PrepareConfig, read: dict[str, Any], shards: list[str]
) -> dict[str, Any]:
    """Commit task `task.task_index`'s record (after its shards): the mark that it finished."""
    record = {
        "format": TASK_RECORD_FORMAT,
        "task_index": task.task_index,
        "num_tasks": task.num_tasks,
        "read": read,
        "shards": shards,
    }
    atomic_write_json(task_record_path(out_dir, task.task_index, task.num_tasks), record)
    return record


def _read_records(
    out_dir: Path, num_tasks: int, info: TokenizerInfo, config: dict[str, Any], problems: dict[int, list[str]]
) -> dict[int, dict[str, Any]]:
    """What each finished task read, by task index; what is wrong with the others goes to `problems`."""
    reads: dict[int, dict[str, Any]] = {}
    for task in range(num_tasks):
        path = task_record_path(out_dir, task, num_tasks)
        try:
            record = json.loads(path.read_text())
            read = record["read"]
            if not isinstance(read, dict):
                raise TypeError(f"'read' is a {type(read).__name__}")
        except FileNotFoundError:
            problems[task].append(f"did not finish (no {path.name})")
            continue
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            problems[task].append(f"unreadable record {path.name} ({error!r})")
            continue
        if record.get("format") != TASK_RECORD_FORMAT:
            problems[task].append(
                f"{path.name} has format {record.get('format')}, expected {TASK_RECORD_FORMAT}"
            )
        elif read.get("tokenizer_fingerprint") != info.fingerprint:
            problems[task].append(
                f"ran with tokenizer {str(read.get('tokenizer_fingerprint'))[:12]}, the merge uses "
                f"{info.fingerprint[:12]} ({info.dir})"
            )
        elif read.get("config") != config:
            problems[task].append(
                f"ran with another source config ({read.get('config')}, the merge has {config})"
            )
        else:
            reads[task] = read
    return reads


# ----------------------------------------------------------------------------------------------- the merge


def merged_manifest(cfg: DataPipelineConfig, source: SourceConfig, info: TokenizerInfo) -> dict[str, Any]:
    """Check every task's record and shard of one source; the manifest a single-process run would write.

    Raises ShardError naming each task that did not finish and each shard that is missing or wrong.
    """
    num_tasks = cfg.prepare.num_tasks
    out_dir = Path(cfg.data.shards_dir) / source.name
    problems: dict[int, list[str]] = {task: [] for task in range(num_tasks)}
    reads = _read_records(out_dir, num_tasks, info, source_config_key(cfg, source), problems)
    if not reads:
        _fail(out_dir, source, num_tasks, problems)
    first = min(reads)
    reference = reads[first]
    for task, read in reads.items():
        if read != reference:
            problems[task].append(
                f"read other documents than task {first} (did the corpus change while the tasks ran?)"
            )
    if any(problems[task] for task in reads):
        _fail(out_dir, source, num_tasks, problems, every_task=True)

    entries: dict[str, dict[int, dict[str, Any]]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        n_docs = reference["splits"][split]["docs"]
        for index, want in enumerate(reference["splits"][split]["shard_digests"]):
            docs = min(cfg.data.docs_per_shard, n_docs - index * cfg.data.docs_per_shard)
            entry, problem = _check_shard(out_dir / shard_name(split, index), info, docs, want)
            owner = shard_owner(index, num_tasks)
            if problem is not None:
                problems[owner].append(f"{shard_name(split, index)} {problem}")
            entries[split][index] = entry
    _check_rejects(out_dir / REJECTS_NAME, reference["rejects"]["total"], problems)
    if any(problems.values()):
        _fail(out_dir, source, num_tasks, problems)
    splits = {split: split_summary(out_dir, split, entries[split]) for split in SPLITS}
    return source_manifest(cfg, source, info, splits, reference["rejects"])


def _check_shard(
    path: Path, info: TokenizerInfo, docs: int, digest: str
) -> tuple[dict[str, Any], str | None]:
    """The shard's manifest entry, and what is wrong with it (None when it holds exactly the expected docs)."""
    if not path.exists():
        return {"file": path.name}, "is missing"
    try:
        shard = open_shard(path, expected_fingerprint=info.fingerprint)
    except ShardError as error:
        return {"file": path.name}, f"is invalid: {error}"
    entry = shard_entry(shard)
    if shard.vocab_size != info.vocab_size:
        return entry, f"has vocab size {shard.vocab_size}, the tokenizer {info.vocab_size}"
    if shard.n_docs != docs or shard.source_digest != digest:
        return entry, f"holds other documents ({shard.n_docs} docs) than the tasks read ({docs} docs)"
    return entry, None


def _check_rejects(path: Path, total: int, problems: dict[int, list[str]]) -> None:
    """Task 0 writes the rejects list; it must list as many records as every task counted."""
    try:
        listed = path.read_bytes().count(b"\n")
    except FileNotFoundError:
        problems[0].append(f"{path.name} is missing")
        return
    if listed != total:
        problems[0].append(f"{path.name} lists {listed} rejects, the tasks counted {total}")


def _fail(
    out_dir: Path,
    source: SourceConfig,
    num_tasks: int,
    problems: dict[int, list[str]],
    every_task: bool = False,
) -> NoReturn:
    failed = sorted(task for task, found in problems.items() if found)
    lines = [f"  task {task}: " + "; ".join(problems[task]) for task in failed]
    rerun = list(range(num_tasks)) if every_task else failed
    raise ShardError(
        f"{out_dir}: cannot merge the {num_tasks} prepare tasks of source {source.name!r}:\n"
        + "\n".join(lines)
        + f"\n{_rerun_hint(rerun, num_tasks)}"
    )
