"""Three preemptions in a row on the real two-node cluster: one wandb run, no duplicated step, a complete log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.slurm.cluster import LocalSlurmCluster
from tests.slurm.test_cluster_smoke import TWO_RANKS, losses_by_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 25 steps of 512 tokens, then 95 of 1024: long enough to be interrupted three times (each incarnation is
# stopped a few steps after it starts).
TOTAL_TOKENS = 12800 + 95 * 1024
STEPS = 120


def wait_until(predicate, timeout: float, explain) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.05)


def test_three_preemptions_keep_one_wandb_run_and_no_duplicated_step(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, debug_artifacts
):
    runs = tmp_path / "runs"
    job = slurm_cluster.sbatch(
        *TWO_RANKS,
        f"--output={tmp_path}/%j.out",
        "slurm/pretrain.sh",
        "+experiment=debug",
        f"paths.artifacts={debug_artifacts}",
        f"paths.runs={runs}",
        f"train.total_tokens={TOTAL_TOKENS}",
        "train.checkpoint_every_steps=50",
        cwd=ROOT,
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    run_dir = runs / "debug"

    def log_tail() -> str:
        out = tmp_path / f"{job}.out"
        return out.read_text()[-4000:] if out.is_file() else "(no log yet)"

    def newest_step() -> int:
        return max(losses_by_step(run_dir), default=0) if (run_dir / "metrics.jsonl").is_file() else 0

    for restart in range(3):
        wait_until(lambda r=restart: slurm_cluster.job(job).get("Restarts") == str(r), 120, log_tail)
        seen = newest_step()
        wait_until(lambda s=seen: newest_step() >= s + 3, 300, log_tail)
        slurm_cluster.signal_job(job, "USR1", batch_only=True)
    record = slurm_cluster.wait_for_job(job, timeout=600)
    log = log_tail()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "3", (record, log)
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)), log
    assert all(len(values) == 1 for values in losses.values()), "a step is duplicated in the log"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    incarnations = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(incarnations) == 4, incarnations
    assert all(p.name.endswith(f"-{run_id}") for p in incarnations), incarnations
