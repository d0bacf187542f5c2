"""Fault handling on the real 2-rank ZeRO-3 run: NaN steps are skipped, divergence aborts, a hung rank times out."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from pretrain.train.faults import HANG_AT_STEP, NAN_AT_STEPS
from tests.helpers import ROOT, read_metrics, run_pretrain

pytestmark = pytest.mark.slow


def _optimizer_tensors(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's optimizer shard (a test reads DeepSpeed's own pickles, so not weights_only)."""
    out = {}
    for path in sorted(checkpoint_dir.glob("*optim_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)

        def walk(prefix, value):
            if isinstance(value, torch.Tensor):
                out[prefix] = value
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}/{k}", v)
            elif isinstance(value, list | tuple):
                for i, v in enumerate(value):
                    walk(f"{prefix}/{i}", v)

        walk(path.name, state["optimizer_state_dict"])
    return out


def test_nan_step_is_skipped_and_leaves_the_optimizer_unchanged(debug_artifacts, tmp_path):
    result = run_pretrain(
        debug_artifacts,
        tmp_path,
        "train.checkpoint_every_steps=4",
        "train.stop_after_steps=5",
        env={NAN_AT_STEPS: "5"},
    )
    assert "step 5 skipped" in result.stderr
    metrics = {m["step"]: m for m in read_metrics(tmp_path / "debug") if "train/loss" in m}
    assert metrics[4]["train/skipped_steps"] == 0 and metrics[5]["train/skipped_steps"] == 1
    ckpts = tmp_path / "debug" / "checkpoints"
    before, after = _optimizer_tensors(ckpts / "step_00000004"), _optimizer_tensors(ckpts / "step_00000005")
    assert before.keys() == after.keys() and len(before) > 0
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_consecutive_bad_steps_abort_with_a_clear_message(debug_artifacts, tmp_path):
    with pytest.raises(AssertionError, match="3 consecutive steps with a non-finite loss"):
        run_pretrain(debug_artifacts, tmp_path, "train.max_bad_steps=3", env={NAN_AT_STEPS: "3,4,5"})


def test_a_hung_rank_makes_the_job_exit_within_the_timeout(debug_artifacts, tmp_path):
    timeout_s = 15
    cmd = [
        sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
        f"paths.runs={tmp_path}", f"deepspeed.timeout_minutes={timeout_s / 60}",
    ]  # fmt: skip
    env = dict(os.environ, **{HANG_AT_STEP: "5"})
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    hung_at = None
    output = []
    for line in proc.stdout:
        output.append(line)
        if "hangs at step 5" in line:
            hung_at = time.monotonic()
    proc.wait(timeout=300)
    exited_at = time.monotonic()
    assert hung_at is not None, "".join(output[-50:])
    assert proc.returncode != 0
    assert exited_at - hung_at < timeout_s + 60, exited_at - hung_at
