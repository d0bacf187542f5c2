"""slurm/prepare.sh with the real `data.prepare` on the local two-node cluster: the job array (one task per
node) and its merge give the same shards, manifest and rejects list as a single-process prepare."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

from data.cli import compose_data_config
from data.manifest import read_manifest
from data.prepare import prepare
from data.tokenizer import train_tokenizer
from tests.helpers import ROOT
from tests.slurm.cluster import LocalSlurmCluster

pytestmark = pytest.mark.slurm

WORDS = [
    "the",
    "a",
    "of",
    "data",
    "token",
    "shard",
    "python",
    "über",
    "naïve",
    "数据",
    "café",
    "🙂",
    "loss",
    "model",
    "42",
    "def",
    "return",
]


def _corpus(path: Path, n_docs: int, seed: int) -> None:
    """Generated JSONL documents with a few bad records among them (so rejects shift the document count)."""
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 50)))}, ensure_ascii=False)
        for _ in range(n_docs)
    ]
    for at, bad in ((3, "{broken"), (90, '{"text": ""}'), (200, '{"body": "no text"}')):
        lines.insert(at, bad)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _reader_files(shards_dir: str) -> dict[str, bytes]:
    directory = Path(shards_dir) / "web"
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def test_prepare_job_array_gives_the_same_shards_as_the_single_process_prepare(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path
):
    corpus = tmp_path / "corpus" / "web.jsonl"
    _corpus(corpus, 300, seed=0)
    overrides = [
        "data=local_jsonl",
        f"data.sources.web.paths=[{corpus}]",
        f"tokenizer.dir={tmp_path / 'tokenizer'}",
        "tokenizer.vocab_size=300",
        "tokenizer.byte_budget=100000",
        "data.docs_per_shard=20",
        "data.val_fraction=0.1",
    ]
    single = compose_data_config([*overrides, f"paths.artifacts={tmp_path / 'single'}"])
    train_tokenizer(single)

    result = slurm_cluster.run(
        "bash",
        "slurm/prepare.sh",
        "--cpus-per-task=1",
        "--",
        *overrides,
        f"paths.artifacts={tmp_path / 'array'}",
        cwd=ROOT,
        env={"PYTHON": sys.executable, "PREPARE_TASKS": "2", "PREPARE_LOG_DIR": str(tmp_path / "logs")},
    )
    merge_job = int(result.stdout.split("merge in job ")[1].split()[0])
    record = slurm_cluster.wait_for_job(merge_job, timeout=240)
    logs = {p.name: p.read_text() for p in sorted((tmp_path / "logs").glob("*"))}
    assert record["JobState"] == "COMPLETED", (record, logs)
    slices = [log for name, log in logs.items() if not name.endswith("-merge.out")]
    assert len(slices) == 2, logs
    assert {node for log in slices for node in ("n1", "n2") if f"node(s) {node}" in log} == {"n1", "n2"}
    assert "source web: merged 2 tasks" in "".join(logs.values()), logs

    prepare(single)
    array = compose_data_config([*overrides, f"paths.artifacts={tmp_path / 'array'}"])
    manifest = read_manifest(array.data.shards_dir, "web")
    for task in (0, 1):  # each task built exactly its own shards (k % 2 == task), none of the other's
        own = sum(i % 2 == task for split in manifest["splits"].values() for i in range(len(split["shards"])))
        summary = re.compile(rf"source web, task {task} of 2: .* in (\d+) shards: 0 reused, (\d+) built")
        found = [m.groups() for log in slices if (m := summary.search(log))]
        assert found == [(str(own), str(own))], logs
    assert manifest == read_manifest(single.data.shards_dir, "web")
    assert manifest["rejects"]["total"] == 3 and len(manifest["splits"]["train"]["shards"]) >= 10
    expected = _reader_files(single.data.shards_dir)
    assert _reader_files(array.data.shards_dir) == expected, "shards differ from the single-process ones"
    assert {"manifest.json", "rejects.jsonl", "train-00000.bin", "val-00000.bin"} <= expected.keys()
