"""data.prepare as a job array: disjoint slices per task, then a merge equal to a single-process prepare."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data import shard_builder
from data.cli import compose_data_config
from data.config import ConfigError
from data.manifest import read_manifest
from data.prepare import prepare
from data.shards import ShardError
from tests.data.prepare_corpus import prepare_config, shard_files, write_corpus


def test_prepare_keys_compose_with_or_without_plus_plus_and_are_checked():
    for prefix in ("", "++"):
        cfg = compose_data_config([f"{prefix}prepare.task_index=2", f"{prefix}prepare.num_tasks=3"])
        assert (cfg.prepare.task_index, cfg.prepare.num_tasks, cfg.prepare.merge) == (2, 3, False)
        assert cfg.prepare.is_slice
    default = compose_data_config([]).prepare
    assert (default.task_index, default.num_tasks, default.merge, default.is_slice) == (0, 1, False, False)
    wrong = {
        ("prepare.task_index=3", "prepare.num_tasks=3"): "prepare.task_index",
        ("prepare.task_index=-1",): "prepare.task_index",
        ("prepare.num_tasks=0",): "prepare.num_tasks",
        ("prepare.merge=true", "prepare.num_tasks=2", "prepare.task_index=1"): "prepare.task_index",
    }
    for overrides, key in wrong.items():
        with pytest.raises(ConfigError, match=key):
            compose_data_config(list(overrides))


ARRAY_TASKS = 3


def _dirty_corpus(path: Path, texts: list[str]) -> None:
    """The texts as JSONL with three bad records among them, so that rejects change the document count."""
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    for at, bad in ((5, "{broken"), (60, '{"text": ""}'), (170, '{"body": "no text"}')):
        lines.insert(at, bad)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _array_config(tmp: Path, corpus: Path, tokenizer_dir: Path, task: int | str):
    """Task `task` of ARRAY_TASKS, or the merge (task="merge"); 20 docs per shard: 11 train, 2 val shards."""
    stage = ["++prepare.merge=true"] if task == "merge" else [f"++prepare.task_index={task}"]
    return prepare_config(
        tmp, corpus, tokenizer_dir, "data.docs_per_shard=20", *stage, f"++prepare.num_tasks={ARRAY_TASKS}"
    )


def _visible_files(cfg) -> dict[str, bytes]:
    """Every file a reader uses: shards, manifest.json, rejects.jsonl (not locks or task records)."""
    directory = Path(cfg.data.shards_dir) / "web"
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


@pytest.fixture
def dirty_corpus(tmp_path, corpus) -> Path:
    path = tmp_path / "corpus" / "dirty.jsonl"
    _dirty_corpus(path, corpus[1])
    return path


@pytest.fixture
def single_process(tmp_path, dirty_corpus, tokenizer_dir):
    """The config of a single-process prepare of the dirty corpus, already run."""
    cfg = prepare_config(tmp_path / "single", dirty_corpus, tokenizer_dir, "data.docs_per_shard=20")
    prepare(cfg)
    return cfg


def test_job_array_gives_the_shards_and_manifest_of_a_single_process_prepare(
    tmp_path, dirty_corpus, tokenizer_dir, single_process
):
    expected = _visible_files(single_process)
    shards = sorted(name for name in expected if name.endswith(".bin"))
    assert len(shards) == 13 and read_manifest(single_process.data.shards_dir, "web")["rejects"]["total"] == 3
    directory = (
        Path(_array_config(tmp_path / "array", dirty_corpus, tokenizer_dir, 0).data.shards_dir) / "web"
    )
    done: set[int] = set()
    for task in (2, 0, 1):
        record = prepare(_array_config(tmp_path / "array", dirty_corpus, tokenizer_dir, task))["web"]
        done.add(task)
        assert not (directory / "manifest.json").exists(), "a task must never write the manifest"
        mine = [name for name in shards if int(name[-9:-4]) % ARRAY_TASKS == task]
        assert record["task_index"] == task and record["shards"] == mine
        on_disk = sorted(p.name for p in directory.glob("*.bin"))
        assert on_disk == [name for name in shards if int(name[-9:-4]) % ARRAY_TASKS in done]
        assert (directory / "rejects.jsonl").exists() == (0 in done), "task 0 alone lists the rejects"
    manifest = prepare(_array_config(tmp_path / "array", dirty_corpus, tokenizer_dir, "merge"))["web"]
    assert manifest == read_manifest(single_process.data.shards_dir, "web")
    merged = _visible_files(_array_config(tmp_path / "array", dirty_corpus, tokenizer_dir, "merge"))
    assert merged.keys() == expected.keys()
    assert merged == expected, "shards, manifest and rejects list must be byte for byte those of one process"
    assert not [p for p in directory.iterdir() if ".tmp" in p.name]


def test_merge_names_every_missing_or_wrong_shard_and_the_task_that_builds_it(
    tmp_path, dirty_corpus, tokenizer_dir, single_process
):
    def run(task):
        return prepare(_array_config(tmp_path, dirty_corpus, tokenizer_dir, task))

    run(0)
    run(2)
    with pytest.raises(ShardError) as missing:
        run("merge")
    message = str(missing.value)
    assert "task 1: did not finish (no .prepare-task-1-of-3.json)" in message
    for name in ("train-00001.bin", "train-00004.bin", "train-00007.bin", "train-00010.bin", "val-00001.bin"):
        assert f"{name} is missing" in message
    assert "task 0:" not in message and "task 2:" not in message
    assert "++prepare.task_index=<i> ++prepare.num_tasks=3" in message and "re-run task(s) 1 " in message
    directory = Path(_array_config(tmp_path, dirty_corpus, tokenizer_dir, 0).data.shards_dir) / "web"
    assert not (directory / "manifest.json").exists()

    run(1)
    (directory / "train-00005.bin").unlink()
    corrupted = bytearray((directory / "train-00002.bin").read_bytes())
    corrupted[-20] ^= 0xFF
    (directory / "train-00002.bin").write_bytes(bytes(corrupted))
    # A valid shard of the same tokenizer and size, but of other documents, under task 0's name.
    (directory / "train-00003.bin").write_bytes((directory / "train-00000.bin").read_bytes())
    with pytest.raises(ShardError) as broken:
        run("merge")
    message = str(broken.value)
    assert "task 2: train-00002.bin is invalid" in message and "checksum" in message
    assert "train-00005.bin is missing" in message
    assert "task 0: train-00003.bin holds other documents" in message
    assert "re-run task(s) 0, 2 " in message and "task 1:" not in message

    before = shard_files(_array_config(tmp_path, dirty_corpus, tokenizer_dir, 0))
    run(0)
    run(2)
    after = shard_files(_array_config(tmp_path, dirty_corpus, tokenizer_dir, 0))
    assert {n for n in after if n not in before or after[n][0] != before[n][0]} == {
        "train-00002.bin",
        "train-00003.bin",
        "train-00005.bin",
    }, "re-running a task rebuilds only its missing or bad shards"
    run("merge")
    assert _visible_files(_array_config(tmp_path, dirty_corpus, tokenizer_dir, 0)) == _visible_files(
        single_process
    )


def test_merge_refuses_tasks_that_read_different_documents(tmp_path, corpus, tokenizer_dir):
    path, texts = corpus
    for task in range(ARRAY_TASKS):
        if task == 2:
            write_corpus(path, [*texts[:100], "an edited document", *texts[101:]])
        prepare(_array_config(tmp_path, path, tokenizer_dir, task))
    with pytest.raises(ShardError, match="task 2: read other documents than task 0") as error:
        prepare(_array_config(tmp_path, path, tokenizer_dir, "merge"))
    assert "re-run task(s) 0, 1, 2 " in str(error.value)


def test_rerunning_a_task_or_the_merge_is_idempotent(tmp_path, dirty_corpus, tokenizer_dir, single_process):
    def run(task):
        return prepare(_array_config(tmp_path, dirty_corpus, tokenizer_dir, task))

    records = [run(task)["web"] for task in range(ARRAY_TASKS)]
    manifest = run("merge")["web"]
    cfg = _array_config(tmp_path, dirty_corpus, tokenizer_dir, 0)
    directory = Path(cfg.data.shards_dir) / "web"
    before = shard_files(cfg)
    # An interrupted earlier run of task 1 and one of task 2 left temporary files behind.
    (directory / ".train-00001.bin.crashed.tmp").write_bytes(b"partial")
    (directory / ".train-00002.bin.crashed.tmp").write_bytes(b"partial")
    assert run(1)["web"] == records[1]
    assert not (directory / ".train-00001.bin.crashed.tmp").exists(), "a task removes its own leftovers"
    assert (directory / ".train-00002.bin.crashed.tmp").exists(), "and never another task's"
    assert shard_files(cfg) == before, "a re-run task must not rewrite any shard"
    assert run("merge")["web"] == manifest
    assert run("merge")["web"] == manifest
    assert shard_files(cfg) == before
    assert _visible_files(cfg) == _visible_files(single_process)
    assert not [p for p in directory.iterdir() if ".tmp" in p.name], "the merge removes every leftover"
    assert len(list(directory.glob(".prepare-task-*-of-3.json"))) == ARRAY_TASKS

    # A single-process prepare over an array's output keeps every shard and drops the task records.
    prepare(prepare_config(tmp_path, dirty_corpus, tokenizer_dir, "data.docs_per_shard=20"))
    assert shard_files(cfg) == before
    assert not list(directory.glob(".prepare-task-*"))


def test_tasks_of_an_array_run_side_by_side(tmp_path, dirty_corpus, tokenizer_dir, monkeypatch):
    """Both tasks must be inside their build at once: a lock that serialised them would break the barrier."""
    barrier = threading.Barrier(2, timeout=60)
    real_finish = shard_builder.SourceBuilder.finish

    def finish_together(self):
        barrier.wait()
        real_finish(self)

    monkeypatch.setattr(shard_builder.SourceBuilder, "finish", finish_together)
    # One worker: no process pool, which must not be forked from a process with several threads.
    configs = [
        prepare_config(
            tmp_path,
            dirty_corpus,
            tokenizer_dir,
            "data.num_workers=1",
            f"++prepare.task_index={task}",
            "++prepare.num_tasks=2",
        )
        for task in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(prepare, configs))
    assert [r["web"]["task_index"] for r in results] == [0, 1]
    monkeypatch.undo()
    merged = prepare(
        prepare_config(tmp_path, dirty_corpus, tokenizer_dir, "++prepare.merge=true", "++prepare.num_tasks=2")
    )
    assert merged["web"]["splits"]["train"]["docs"] + merged["web"]["splits"]["val"]["docs"] == 250


def test_merge_after_a_one_task_array_checks_the_manifest_that_task_wrote(tmp_path, corpus, tokenizer_dir):
    """PREPARE_TASKS=1: the one task is a whole prepare; the merge only checks that it finished."""
    path, _ = corpus
    merge = ("++prepare.merge=true", "++prepare.num_tasks=1")
    with pytest.raises(ShardError, match=r"nothing to merge with prepare\.num_tasks=1: .*no manifest"):
        prepare(prepare_config(tmp_path, path, tokenizer_dir, *merge))
    manifest = prepare(
        prepare_config(tmp_path, path, tokenizer_dir, "++prepare.task_index=0", "++prepare.num_tasks=1")
    )
    assert prepare(prepare_config(tmp_path, path, tokenizer_dir, *merge)) == manifest
