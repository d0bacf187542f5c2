"""A preempted job that comes back on fewer nodes continues the same run, on the real two-node cluster.

`sbatch -N 2 slurm/pretrain.sh` is preempted (USR1); while it waits to be requeued its allocation shrinks to
one node (`scontrol update NumNodes=1`), as when a cluster hands a requeued job another allocation. The job
resumes on one rank from the checkpoint two ranks wrote (through its universal copy), with nothing asked of
the user, and finishes as one run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurmCluster
from tests.slurm.test_cluster_smoke import losses_by_step, submit_debug_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_job_requeued_on_one_node_continues_the_run(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, debug_artifacts, debug_run: Path
):
    job = submit_debug_run(slurm_cluster, tmp_path, debug_artifacts)
    run_dir = tmp_path / "runs" / "debug"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or max(losses_by_step(run_dir), default=0) < 3:
        assert time.monotonic() < deadline, (tmp_path / f"{job}.out").read_text()[-3000:]
        time.sleep(0.05)
    slurm_cluster.signal_job(job, "USR1", batch_only=True)
    deadline = time.monotonic() + 300
    while slurm_cluster.job(job).get("Restarts") != "1":  # the ranks checkpointed, the job requeued itself
        assert time.monotonic() < deadline, (tmp_path / f"{job}.out").read_text()[-3000:]
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "hold", str(job))
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "NumTasks=1", "NumNodes=1", "NumCPUs=1")
    slurm_cluster.run("scontrol", "release", str(job))
    record = slurm_cluster.wait_for_job(job, timeout=500)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["NumNodes"] == "1", (record, log[-6000:])
    assert "written by 2 ranks, this run has 1: converted in" in log, log[-6000:]

    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 41)) and all(len(v) == 1 for v in losses.values()), log[-3000:]
    reference = {s: v[0] for s, v in losses_by_step(debug_run).items()}  # 2 ranks, uninterrupted
    for step, (loss,) in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-3), step
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    incarnations = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(incarnations) == 2 and all(p.name.endswith(f"-{run_id}") for p in incarnations)
