"""Resume with Mixture-of-Experts layers: the fused expert tensors, the router and their Adam states survive a
kill exactly, and a move to another number of ranks through DeepSpeed's universal checkpoint.

The debug model with 4 experts of width 88 (top-2) in each of its 2 layers, 30 steps (the batch grows from 512 to
1024 tokens at step 26), a checkpoint every 7 steps. Rank 0 is SIGKILLed after step 23; the run resumes from step
21 on 2 ranks, and a copy of it on 1 rank:
* 2 ranks: every step's loss and router metrics (balance and z-losses, expert shares) equal the uninterrupted
  run's bitwise;
* 1 rank: the checkpoint is converted, the same global samples are read, the losses agree within 1e-3 relative
  (fp32: reductions over 1 rank differ from 2) and the expert loads within 1e-2 absolute.
Then `python -m pretrain.evaluate` on the finished run draws the expert load by layer from its step log.

Expert parallelism (DeepSpeed AutoEP, `deepspeed.expert_parallel_size`): the same run with each layer's experts
split over 2 ranks (EP = 2) takes the same steps as plain ZeRO-3, losses and grad norms (which carry the router
losses) within 1e-5 relative (observed about 2e-8), stops at step 14 and resumes on 1 rank (EP = 1) through the
universal checkpoint, within 1e-3 of the uninterrupted run (observed about 1e-7); its final checkpoint, which
`zero_to_fp32` refuses, consolidates through its universal copy to the straight run's weights within 1e-4, and
`evaluate` reads it; resuming it with expert parallelism switched off is refused naming the key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pretrain.checkpoint import newest_weights
from pretrain.evaluation.expert_load import expert_load_history
from pretrain.train.faults import KILL_AT_STEP
from tests.helpers import ROOT, read_metrics, run_pretrain, step_losses
from tests.pretrain.model.test_parity import weights_difference

pytestmark = pytest.mark.slow

STEPS = 30
OVERRIDES = (
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_ffn_dim=88",
    f"train.total_tokens={25 * 512 + (STEPS - 25) * 1024}",
    "train.checkpoint_every_steps=7",
    "train.eval_every_steps=0",
    "train.sample_tokens=0",
    "train.run_name=moe",
)


def train_metrics(run_dir) -> dict[int, dict[str, float]]:
    return {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}


def router_metrics(run_dir) -> dict[int, dict[str, float]]:
    return {
        m["step"]: {k: v for k, v in m.items() if k.startswith("moe/")}
        for m in read_metrics(run_dir)
        if "train/loss" in m
    }


@pytest.fixture(scope="module")
def moe_straight(debug_artifacts, tmp_path_factory):
    """The uninterrupted 30-step MoE run (plain ZeRO-3, 2 ranks), and a directory for the others."""
    tmp_path = tmp_path_factory.mktemp("moe-resume")
    straight = tmp_path / "straight"
    run_pretrain(debug_artifacts, straight, *OVERRIDES)
    return straight, tmp_path


def test_moe_run_resumes_exactly_after_a_kill_and_on_another_world_size(moe_straight, debug_artifacts):
    straight, tmp_path = moe_straight

    runs, moved = tmp_path / "runs", tmp_path / "moved"
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
           f"paths.runs={runs}", *OVERRIDES]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    killed = subprocess.run(
        cmd, cwd=ROOT, env={**env, KILL_AT_STEP: "23"}, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode != 0
    assert max(step_losses(runs / "moe")) == 23
    shutil.copytree(runs, moved)

    run_pretrain(debug_artifacts, runs, *OVERRIDES)
    resumed, reference = router_metrics(runs / "moe"), router_metrics(straight / "moe")
    assert list(resumed) == list(range(1, STEPS + 1))
    assert step_losses(runs / "moe") == step_losses(straight / "moe")
    assert resumed == reference
    assert reference[STEPS]["moe/max_load"] > 1.0  # the loads are not trivially equal

    log = run_pretrain(debug_artifacts, moved, *OVERRIDES, "train.local_processes=1")
    assert "written by 2 ranks, this run has 1: converted in" in log.stderr
    one_rank = {m["step"]: m for m in read_metrics(moved / "moe") if "train/loss" in m}
    straight_metrics = {m["step"]: m for m in read_metrics(straight / "moe") if "train/loss" in m}
    assert sorted(one_rank) == list(range(1, STEPS + 1))
    for step in range(22, STEPS + 1):
        got, want = one_rank[step], straight_metrics[step]
        assert got["train/samples"] == want["train/samples"], step
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-3), step
        shares = [k for k in want if k.startswith("moe/share/")]
        assert shares and all(got[k] == pytest.approx(want[k], abs=1e-2) for k in shares), step

    evaluated = subprocess.run(
        [sys.executable, "-m", "pretrain.evaluate", f"run={runs / 'moe'}", "batches=1", "device=cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    png = runs / "moe" / "eval" / f"step_{STEPS:08d}" / "expert_load.png"
    assert f"wrote {png}" in evaluated.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    history = expert_load_history(runs / "moe" / "metrics.jsonl")
    assert list(history) == [0, 1]
    assert history[0]["steps"] == list(range(1, STEPS + 1))
    assert all(len(s) == 4 and abs(sum(s) - 1) < 1e-9 for s in history[1]["shares"])
    assert history[1]["max_load"][-1] == reference[STEPS]["moe/max_load/layer1"]


def test_expert_parallel_run_equals_plain_zero3_and_moves_to_another_world_size(
    moe_straight, debug_artifacts
):
    straight, tmp_path = moe_straight
    runs = tmp_path / "ep"
    ep = ("deepspeed.expert_parallel_size=2", "train.stop_after_steps=14")
    log = run_pretrain(debug_artifacts, runs, *OVERRIDES, *ep)
    assert "replaced by DeepSpeed AutoEP's" in log.stderr
    reference = train_metrics(straight / "moe")
    first = train_metrics(runs / "moe")
    assert sorted(first) == list(range(1, 15))
    for step, got in first.items():
        want = reference[step]
        for key in ("train/loss", "train/grad_norm", "moe/load_balance_loss", "moe/z_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)

    moved = run_pretrain(
        debug_artifacts, runs, *OVERRIDES, "deepspeed.expert_parallel_size=1", "train.local_processes=1"
    )
    assert "written by 2 ranks, this run has 1: converted in" in moved.stderr
    after = train_metrics(runs / "moe")
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(15, STEPS + 1):
        assert after[step]["train/samples"] == reference[step]["train/samples"], step
        assert after[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-3), step

    checkpoint, weights = newest_weights(runs / "moe")
    assert checkpoint.step == STEPS
    _, plain = newest_weights(straight / "moe")
    assert sorted(weights) == sorted(plain)
    assert weights_difference(weights, plain) < 1e-4
    evaluated = subprocess.run(
        [sys.executable, "-m", "pretrain.evaluate", f"run={runs / 'moe'}", "batches=1", "device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RANK"},
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    # Expert parallelism switched off on resume: refused naming the key, not every checkpoint called broken.
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
           f"paths.runs={runs}", *OVERRIDES, f"train.total_tokens={25 * 512 + (STEPS - 24) * 1024}",
           "deepspeed.expert_parallel_size=0"]  # fmt: skip
    switched = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in os.environ.items() if k != "RANK"})  # fmt: skip
    assert switched.returncode != 0
    assert (
        "deepspeed.expert_parallel_size: this run's checkpoints were written with expert" in switched.stderr
    )
    assert "broken" not in switched.stderr
