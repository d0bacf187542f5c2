"""Stages: a run that starts from another run's checkpoint, on real ZeRO-3 gloo ranks.

The parent is the shared 2-rank debug run; the stage trains on 1 rank at twice the sequence length with a
larger RoPE base, so its first start goes through the parent's universal copy. It records its parent, starts
from the parent's weights with a fresh optimizer (or the parent's moments, for an annealing stage), and a
stage killed mid-way resumes the stage itself with the same per-step losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import ensure_tokenizer, load_tokenizer
from pretrain.checkpoint import find_checkpoint
from pretrain.config import ConfigError, compose_pretrain_config
from pretrain.faults import KILL_AT_STEP
from pretrain.stages import architecture_differences, check_compatible
from tests.helpers import ROOT, read_metrics, run_pretrain, step_losses

STAGE = ("train.run_name=stage", "train.local_processes=1", "model.max_seq_len=128", "data.packing.seq_len=128",
         "model.rope_base=40000", "train.total_tokens=8192", "train.global_batch_tokens=1024",
         "train.start_batch_tokens=0", "train.eval_every_steps=0", "train.checkpoint_every_steps=3",
         "train.sample_tokens=0")  # fmt: skip


def adam_steps(checkpoint: Path) -> set[float]:
    """The AdamW step counters of a ZeRO-3 checkpoint's sub-groups (rank 0's optimizer file)."""
    (path,) = checkpoint.glob("*zero_pp_rank_0_*optim_states.pt")
    state = torch.load(path, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    return {float(s["step"]) for s in state.values()}


@pytest.fixture(scope="module")
def stage(debug_run, debug_artifacts, tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("stage-runs")
    result = run_pretrain(debug_artifacts, runs, f"train.init_from={debug_run}", *STAGE)
    return runs / "stage", result.stderr


@pytest.mark.slow
def test_a_stage_starts_from_its_parents_weights_and_records_it(stage, debug_run):
    run_dir, log = stage
    parent = json.loads((run_dir / "parent.json").read_text())
    newest = sorted((debug_run / "checkpoints").glob("step_*"))[-1]
    assert parent["checkpoint"] == str(newest.resolve()) and parent["step"] == 40
    assert parent["config"]["model"]["max_seq_len"] == 64 and parent["init_optimizer"] is False
    assert "written by 2 ranks, this run has 1: converted in" in log and "with a fresh optimizer" in log
    losses = step_losses(run_dir)
    fresh = step_losses(debug_run)[1]  # the parent's first step, from random weights
    assert losses[1] < fresh - 0.5, (losses[1], fresh)  # it starts where the parent ended, not from scratch
    # A fresh optimizer: after the stage's 8 steps AdamW has taken 8 steps, not the parent's 40 + 8.
    assert adam_steps(run_dir / "checkpoints" / "step_00000008") == {8.0}


@pytest.mark.slow
def test_an_annealing_stage_continues_the_parents_moments(debug_run, debug_artifacts, tmp_path):
    run_pretrain(debug_artifacts, tmp_path, f"train.init_from={debug_run}", "train.init_optimizer=true",
                 *STAGE, "train.stop_after_steps=3")  # fmt: skip
    assert adam_steps(tmp_path / "stage" / "checkpoints" / "step_00000003") == {43.0}


@pytest.mark.slow
def test_a_killed_stage_resumes_the_stage_with_the_same_losses(stage, debug_run, debug_artifacts, tmp_path):
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
           f"paths.runs={tmp_path}", f"train.init_from={debug_run}", *STAGE]  # fmt: skip
    killed = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **{KILL_AT_STEP: "5"}), capture_output=True)
    assert killed.returncode != 0 and max(step_losses(tmp_path / "stage")) == 5
    resumed = run_pretrain(debug_artifacts, tmp_path, f"train.init_from={debug_run}", *STAGE)
    assert "resumed from" in resumed.stderr and "starts from" not in resumed.stderr
    steps = [m["step"] for m in read_metrics(tmp_path / "stage") if "train/loss" in m]
    assert steps == list(range(1, 9))
    assert step_losses(tmp_path / "stage") == step_losses(stage[0])


@pytest.mark.slow
def test_a_parent_of_another_architecture_or_tokenizer_is_refused_naming_the_difference(
    debug_run, debug_artifacts
):
    parent = find_checkpoint(debug_run)
    same = [f"paths.artifacts={debug_artifacts}", "+experiment=debug", "model.max_seq_len=128",
            "data.packing.seq_len=128", "model.rope_base=5e5"]  # fmt: skip
    ok = compose_pretrain_config(same)
    check_compatible(
        parent, parent.config(), ok, load_tokenizer(ok.tokenizer.dir)[1]
    )  # RoPE and length may change
    deeper = compose_pretrain_config([*same, "model.n_layers=3"])
    assert architecture_differences(parent.config().model, deeper.model) == [
        "model.n_layers: parent 2, this run 3"
    ]
    other = compose_pretrain_config(
        [*same, "model.n_layers=3", "tokenizer.vocab_size=600", "model.vocab_size=600"]
    )
    ensure_tokenizer(other.data_pipeline())  # a real second tokenizer: other ids for the same text
    with pytest.raises(ConfigError, match=r"train\.init_from: .*model\.vocab_size: parent 512, this run 600; "
                       r"model\.n_layers: parent 2, this run 3; tokenizer: parent .*fingerprint"):  # fmt: skip
        check_compatible(parent, parent.config(), other, load_tokenizer(other.tokenizer.dir)[1])
