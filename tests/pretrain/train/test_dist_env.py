"""The launch environment of a rank, as srun, torchrun or our launcher leave it on a cluster node."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pretrain.train.dist_env import LaunchError, cuda_device_index, dist_env, launch_environment
from tests.helpers import ROOT

SRUN_TWO_NODES = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}


def test_srun_variables_become_the_torchrun_ones():
    env = launch_environment({**SRUN_TWO_NODES, "MASTER_ADDR": "node7", "MASTER_PORT": "15123"})
    assert env == {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "15123",
    }
    assert dist_env(env).rank == 1 and dist_env(env).world_size == 4 and not dist_env(env).is_main


def test_a_multi_node_srun_job_without_a_rendezvous_address_fails_at_once_naming_the_variables():
    with pytest.raises(LaunchError) as err:
        launch_environment(SRUN_TWO_NODES)
    assert "MASTER_ADDR" in str(err.value) and "MASTER_PORT" in str(err.value)
    assert "slurm/pretrain.sh" in str(err.value)


def test_a_torchrun_style_job_spanning_nodes_without_an_address_fails_too():
    with pytest.raises(LaunchError):
        launch_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    "environ",
    [
        {},  # a plain process
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1"},
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
    ],
)
def test_ranks_on_one_machine_meet_on_the_loopback_address(environ):
    assert launch_environment(environ)["MASTER_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [(3, 8, 3), (0, 8, 0), (3, 1, 0), (0, 1, 0)],  # all GPUs of the node visible / one GPU bound per task
)
def test_a_rank_drives_its_local_gpu_or_the_one_it_was_bound_to(local_rank, visible, expected):
    assert cuda_device_index(local_rank, visible) == expected


def test_more_ranks_than_visible_gpus_is_refused_naming_the_cause():
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=3 but this task sees only 2 GPUs"):
        cuda_device_index(3, 2)
    with pytest.raises(LaunchError, match="no CUDA device"):
        cuda_device_index(0, 0)


def test_the_trainer_under_a_two_node_srun_without_master_addr_stops_in_one_line(tmp_path):
    """`python -m pretrain` as srun starts it on a node of a 2-node job that no script gave an address: it
    stops at once with one line naming the variables, instead of waiting out the collective timeout."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))
    }
    env.update(SRUN_TWO_NODES, SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0")
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.runs={tmp_path}"]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "MASTER_ADDR is not set" in result.stderr
    assert time.monotonic() - start < 60
