"""`python -m pretrain` joins the process group of every launcher the README names.

torchrun and the deepspeed launcher start the ranks themselves (the latter passes `--local_rank=N`); each
rank uses its share of the cores, so the run is the same run: its first steps equal those of the shared debug
run, bit for bit. srun is covered by the Slurm tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, step_losses

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STEPS = 5


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "pretrain"], id="torchrun"),
        pytest.param([str(BIN / "deepspeed"), "--num_gpus=2", "--module", "pretrain"], id="deepspeed"),
    ],
)
def test_a_launcher_started_run_equals_our_own(launcher, debug_run, debug_artifacts, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "OMP_NUM_THREADS")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [
        *launcher, "+experiment=debug", f"paths.artifacts={debug_artifacts}", f"paths.runs={tmp_path}",
        f"train.stop_after_steps={STEPS}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 ranks on CPU, 1 threads per rank" in result.stdout + result.stderr
    ours = step_losses(debug_run)
    assert step_losses(tmp_path / "debug") == {step: ours[step] for step in range(1, STEPS + 1)}


def test_launcher_arguments_are_taken_out_of_the_overrides(monkeypatch):
    from pretrain.train.launch import accept_launcher_arguments

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["pretrain", "--local_rank=1", "+experiment=debug"]
    accept_launcher_arguments(argv)
    assert argv == ["pretrain", "+experiment=debug"] and os.environ["LOCAL_RANK"] == "1"
    argv = ["pretrain", "train.seed=3", "--local_rank", "0"]
    accept_launcher_arguments(argv)
    assert argv == ["pretrain", "train.seed=3"] and os.environ["LOCAL_RANK"] == "1"  # the launcher's env wins
