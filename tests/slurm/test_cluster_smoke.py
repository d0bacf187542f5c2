"""The Slurm side on a real two-node cluster: the cluster itself, signals, requeue, and our sbatch scripts.

The script tests put a stand-in for python on PYTHON (`$PYTHON -m pretrain ...` records what it was given and
waits for USR1), so they check what slurm/*.sh do (rendezvous variables, one rank per task, forwarding
USR1, requeue, the restart limit, array slices then merge) in seconds; the last two run the real trainer
(a debug run on both nodes, and one preempted with USR1 after its first checkpoint that requeues and resumes).
"""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_metrics
from tests.slurm.cluster import LocalSlurmCluster

pytestmark = pytest.mark.slurm

# Two one-CPU nodes without GPUs: everything the header of pretrain.sh asks for beyond that is overridden.
TWO_RANKS = ("-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1")

# Stands in for python: `-c` goes to the real interpreter (the scripts' import check), `-m <module> args`
# is recorded per call in $FAKE_OUT; on the first run of a job it waits for USR1 unless FAKE_WAIT=0.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {python} "$@"; fi
out=$FAKE_OUT
run=${{SLURM_RESTART_COUNT:-0}}
tag=${{SLURM_ARRAY_TASK_ID:-x}}-$run-${{SLURM_PROCID:-0}}
echo "$*" > "$out/args-$tag"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|SLURM_PROCID|SLURM_NTASKS|SLURMD_NODENAME|OMP_NUM_THREADS)=' \\
    | sort > "$out/env-$tag"
trap 'echo saved > "$out/saved-$tag"; exit 0' USR1
touch "$out/ready-$tag"
if [ "$run" = 0 ] && [ "${{FAKE_WAIT:-1}}" = 1 ]; then
    for _ in $(seq 600); do sleep 0.1; done
    exit 7
fi
touch "$out/done-$tag"
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """(the stand-in interpreter, the directory it records into)."""
    out = tmp_path / "calls"
    out.mkdir()
    script = tmp_path / "fake-python"
    script.write_text(FAKE_PYTHON.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, out


def wait_for_files(paths: list[Path], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"never appeared: {[str(p) for p in paths if not p.exists()]}")
        time.sleep(0.1)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


# ---- the cluster --------------------------------------------------------------------------------------------


def test_both_nodes_are_idle(slurm_cluster: LocalSlurmCluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
    assert out == ["n1", "idle", "n2", "idle"]


def test_two_node_job_runs_one_task_on_each_node(slurm_cluster: LocalSlurmCluster, tmp_path: Path):
    # stderr apart: srun reports its own retries there ("step creation temporarily disabled, retrying" while
    # the first step's nodes are still being released), and they are not the job's output.
    job = slurm_cluster.sbatch(
        "-N", "2",
        f"--output={tmp_path}/%j.out",
        f"--error={tmp_path}/%j.err",
        "--wrap", "srun hostname; srun printenv SLURMD_NODENAME",
    )  # fmt: skip
    record = slurm_cluster.wait_for_job(job)
    assert record["JobState"] == "COMPLETED", (record, (tmp_path / f"{job}.err").read_text())
    lines = (tmp_path / f"{job}.out").read_text().splitlines()
    assert lines[:2] == [slurm_cluster.hostname] * 2
    assert sorted(lines[2:]) == ["n1", "n2"]


def test_usr1_sent_with_batch_reaches_the_trap_of_the_batch_shell(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path
):
    script = tmp_path / "trap.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"trap 'echo caught > {tmp_path}/caught; exit 0' USR1\n"
        f"touch {tmp_path}/ready\n"
        "for _ in $(seq 600); do sleep 0.1; done\n"  # short commands: bash runs the trap between them
        "exit 3\n"
    )
    job = slurm_cluster.sbatch(f"--output={tmp_path}/%j.out", str(script))
    wait_for_files([tmp_path / "ready"])
    slurm_cluster.signal_job(job, "USR1", batch_only=True)
    record = slurm_cluster.wait_for_job(job)
    assert record["JobState"] == "COMPLETED", record
    assert (tmp_path / "caught").read_text().strip() == "caught"


def test_a_job_that_requeues_itself_runs_again_with_restart_count_one(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path
):
    script = tmp_path / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "run ${SLURM_RESTART_COUNT:-0}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 30; exit 4; fi\n'
        "echo finished\n"
    )
    job = slurm_cluster.sbatch("--requeue", "--open-mode=append", f"--output={tmp_path}/%j.out", str(script))
    record = slurm_cluster.wait_for_job(job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    log = (tmp_path / f"{job}.out").read_text()
    assert "run 0" in log and "run 1\nfinished" in log


# ---- slurm/pretrain.sh --------------------------------------------------------------------------------------


def submit_pretrain(cluster: LocalSlurmCluster, tmp_path: Path, python: Path, *extra: str, env=None) -> int:
    return cluster.sbatch(
        *TWO_RANKS,
        f"--output={tmp_path}/%j.out",
        "slurm/pretrain.sh",
        "+experiment=debug",
        *extra,
        cwd=ROOT,
        env={"PYTHON": str(python), "FAKE_OUT": str(python.parent / "calls"), **(env or {})},
    )


def test_pretrain_script_runs_one_rank_per_task_with_a_shared_rendezvous(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, fake_python
):
    python, out = fake_python
    job = submit_pretrain(slurm_cluster, tmp_path, python, "train.max_steps=3", env={"FAKE_WAIT": "0"})
    record = slurm_cluster.wait_for_job(job)
    assert record["JobState"] == "COMPLETED", (record, (tmp_path / f"{job}.out").read_text())
    envs = [read_env(out / f"env-x-0-{rank}") for rank in (0, 1)]
    assert [e["SLURM_PROCID"] for e in envs] == ["0", "1"]
    assert {e["SLURMD_NODENAME"] for e in envs} == {"n1", "n2"}
    assert all(e["SLURM_NTASKS"] == "2" and e["MASTER_ADDR"] == "n1" for e in envs)
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] == str(15000 + job % 10000)
    assert (out / "args-x-0-0").read_text().split() == [
        "-m",
        "pretrain",
        "+experiment=debug",
        "train.max_steps=3",
    ]


PROCESS_GROUP_CHECK = """
import torch
import torch.distributed as dist
from pretrain.train.engine import init_distributed, shutdown

env = init_distributed(1)
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
print(f"rank {env.rank} of {env.world_size}: sum {total.item()}", flush=True)
shutdown()
"""


def test_pretrain_script_ranks_on_two_nodes_join_one_process_group(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path
):
    """The trainer's own `init_distributed` under srun: rank, world size and rendezvous come from the script."""
    check = tmp_path / "check.py"
    check.write_text(PROCESS_GROUP_CHECK)
    python = tmp_path / "python"
    python.write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
        f"PYTHONPATH={ROOT} exec {sys.executable} {check}\n"
    )
    python.chmod(0o755)
    job = submit_pretrain(slurm_cluster, tmp_path, python)
    record = slurm_cluster.wait_for_job(job, timeout=180)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", (record, log[-3000:])
    assert "rank 0 of 2: sum 3.0" in log and "rank 1 of 2: sum 3.0" in log, log[-3000:]


def test_pretrain_script_forwards_usr1_to_every_rank_then_requeues(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, fake_python
):
    python, out = fake_python
    job = submit_pretrain(slurm_cluster, tmp_path, python)
    wait_for_files([out / "ready-x-0-0", out / "ready-x-0-1"])
    slurm_cluster.signal_job(job, "USR1", batch_only=True)
    record = slurm_cluster.wait_for_job(job)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log)
    assert (out / "saved-x-0-0").exists() and (out / "saved-x-0-1").exists(), log
    assert (out / "done-x-1-0").exists() and (out / "done-x-1-1").exists(), log
    assert "requeueing job" in log and "restart 1," in log


def test_pretrain_script_stops_instead_of_requeueing_past_max_restarts(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, fake_python
):
    python, out = fake_python
    job = submit_pretrain(slurm_cluster, tmp_path, python, env={"MAX_RESTARTS": "0"})
    wait_for_files([out / "ready-x-0-0", out / "ready-x-0-1"])
    slurm_cluster.signal_job(job, "USR1", batch_only=True)
    record = slurm_cluster.wait_for_job(job)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", (record, log)
    assert (out / "saved-x-0-0").exists()
    assert "(MAX_RESTARTS=0); not requeueing" in log


# ---- slurm/prepare.sh and slurm/tokenizer.sh ------------------------------------------------------------


def test_prepare_driver_submits_slices_then_a_merge_that_waits_for_them(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, fake_python
):
    python, out = fake_python
    result = slurm_cluster.run(
        "bash",
        "slurm/prepare.sh",
        "--cpus-per-task=1",
        "--",
        "data=embedded",
        cwd=ROOT,
        env={
            "PYTHON": str(python),
            "FAKE_OUT": str(out),
            "FAKE_WAIT": "0",
            "PREPARE_TASKS": "2",
            "PREPARE_LOG_DIR": str(tmp_path / "logs"),
        },
    )
    merge_job = int(result.stdout.split("merge in job ")[1].split()[0])
    record = slurm_cluster.wait_for_job(merge_job)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*")))
    assert record["JobState"] == "COMPLETED", (record, logs)
    slices = sorted((out / f"args-{task}-0-0").read_text() for task in (0, 1))
    assert slices == [
        f"-m data.prepare data=embedded ++prepare.task_index={i} ++prepare.num_tasks=2 data.num_workers=1\n"
        for i in (0, 1)
    ]
    merge = (out / "args-x-0-0").read_text()
    assert (
        merge
        == "-m data.prepare data=embedded ++prepare.merge=true ++prepare.num_tasks=2 data.num_workers=1\n"
    )
    merge_started = (out / "ready-x-0-0").stat().st_mtime
    assert all((out / f"done-{task}-0-0").stat().st_mtime <= merge_started for task in (0, 1))


def test_tokenizer_script_trains_a_tokenizer(slurm_cluster: LocalSlurmCluster, tmp_path: Path):
    job = slurm_cluster.sbatch(
        "--cpus-per-task=1",
        f"--output={tmp_path}/%j.out",
        "slurm/tokenizer.sh",
        "tokenizer.vocab_size=300",
        "tokenizer.byte_budget=100000",
        f"paths.artifacts={tmp_path}/artifacts",
        cwd=ROOT,
        env={"PYTHON": sys.executable},
    )
    record = slurm_cluster.wait_for_job(job, timeout=120)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", (record, log)
    assert list((tmp_path / "artifacts" / "tokenizers").glob("*/tokenizer.json")), log


# ---- the real trainer ---------------------------------------------------------------------------------------


def submit_debug_run(cluster: LocalSlurmCluster, tmp_path: Path, artifacts: Path) -> int:
    """`sbatch slurm/pretrain.sh +experiment=debug` on both nodes with the real interpreter."""
    return cluster.sbatch(
        *TWO_RANKS,
        f"--output={tmp_path}/%j.out",
        "slurm/pretrain.sh",
        "+experiment=debug",
        f"paths.artifacts={artifacts}",
        f"paths.runs={tmp_path / 'runs'}",
        cwd=ROOT,
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    for m in read_metrics(run_dir):
        if "train/loss" in m:
            losses.setdefault(m["step"], []).append(m["train/loss"])
    return losses


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: LocalSlurmCluster, tmp_path_factory, debug_artifacts) -> Path:
    """`sbatch -N 2 slurm/pretrain.sh +experiment=debug` run to completion; its run directory."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    job = submit_debug_run(slurm_cluster, tmp_path, debug_artifacts)
    record = slurm_cluster.wait_for_job(job, timeout=500)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", (record, log[-6000:])
    return tmp_path / "runs" / "debug"


@pytest.mark.slow
def test_pretrain_debug_completes_on_two_nodes(uninterrupted: Path):
    assert sorted(losses_by_step(uninterrupted)) == list(range(1, 41))


@pytest.mark.slow
def test_preempted_run_requeues_resumes_and_matches_the_uninterrupted_losses(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, debug_artifacts, uninterrupted: Path
):
    """USR1 to the batch shell mid-run: every rank checkpoints at the same step and exits, the job requeues
    itself and resumes; the per-step losses equal those of the uninterrupted run, bit for bit."""
    job = submit_debug_run(slurm_cluster, tmp_path, debug_artifacts)
    run_dir = tmp_path / "runs" / "debug"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or max(losses_by_step(run_dir), default=0) < 3:
        assert time.monotonic() < deadline, (tmp_path / f"{job}.out").read_text()[-3000:]
        time.sleep(0.05)
    slurm_cluster.signal_job(job, "USR1", batch_only=True)
    record = slurm_cluster.wait_for_job(job, timeout=500)
    log = (tmp_path / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log[-6000:])
    assert "USR1: asking the ranks" in log and "checkpointing at step" in log
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 41)), log[-3000:]
    assert all(len(values) == 1 for values in losses.values()), "a step is duplicated in the log"
    assert {s: v[0] for s, v in losses.items()} == {s: v[0] for s, v in losses_by_step(uninterrupted).items()}
