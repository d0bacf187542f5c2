"""The real thing end to end: `python -m pretrain +experiment=debug`, 2 CPU ranks, DeepSpeed ZeRO-3 over gloo.

The debug run is 40 optimizer steps: 25 of 512 tokens, then the batch grows to 1024 tokens (gradient
accumulation 1 -> 2), with checkpoints every 10 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import compose_pretrain_config
from pretrain.faults import KILL_AT_STEP
from pretrain.schedule import LRSchedule
from tests.helpers import ROOT, WANDB_SECRET, read_metrics, run_pretrain, step_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight_run(debug_run_output) -> tuple[Path, subprocess.CompletedProcess]:
    return debug_run_output


def test_loss_falls_on_the_embedded_corpus(straight_run):
    run_dir, _ = straight_run
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    first = sum(losses[s] for s in range(1, 4)) / 3
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.7, (first, last)
    val = [m["val/loss"] for m in read_metrics(run_dir) if "val/loss" in m]
    assert len(val) >= 4 and val[-1] < val[0]


def test_the_run_directory_records_the_deepspeed_config_that_ran(straight_run):
    ds = json.loads((straight_run[0] / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["data_types"]["grad_accum_dtype"] == ds["communication_data_type"] == "fp32"
    assert ds["bf16"]["enabled"] is False  # the debug experiment trains in fp32
    assert "training in fp32 (deepspeed.precision=fp32)" in straight_run[1].stderr


def test_zero3_shards_parameters_across_both_ranks(straight_run):
    summary = json.loads((straight_run[0] / "model_summary.json").read_text())
    per_rank, total = summary["parameters_per_rank"], summary["parameters"]
    assert summary["world_size"] == 2 and len(per_rank) == 2
    for local in per_rank:
        assert 0.45 * total <= local <= 0.55 * total, (per_rank, total)


def test_weight_decay_applies_to_matrices_only(straight_run):
    """Norms and embeddings are exempt by default; every projection matrix decays (real shapes under ZeRO-3)."""
    decayed = set(json.loads((straight_run[0] / "model_summary.json").read_text())["weight_decay_parameters"])
    assert decayed and all("norm" not in n and "embed" not in n for n in decayed)
    assert {"lm_head.weight", "layers.0.mlp.gate_proj.weight", "layers.1.attn.o_proj.weight"} <= decayed


def test_lr_curve_equals_the_formula_and_batch_growth_changes_accumulation(straight_run):
    run_dir, _ = straight_run
    cfg = compose_pretrain_config(["+experiment=debug"])
    lr = LRSchedule(cfg.optim.lr, cfg.optim.warmup_tokens, cfg.train.total_tokens, cfg.optim.min_lr_ratio)
    steps = [m for m in read_metrics(run_dir) if "train/lr" in m]
    for m in steps:
        assert m["train/lr"] == pytest.approx(lr(int(m["train/tokens"])), rel=1e-12)
    growth_at = cfg.train.batch_ramp_tokens
    for m in steps:
        before = m["train/tokens"] - m["train/batch_tokens"]
        expected = 512 if before < growth_at else 1024
        assert m["train/batch_tokens"] == expected
        assert m["train/grad_accum"] == expected // 512  # 2 ranks x micro-batch 4 x 64 tokens = 512 per pass
    assert {m["train/grad_accum"] for m in steps} == {1.0, 2.0}


def test_wandb_offline_files_hold_the_metrics_and_no_secret(straight_run):
    run_dir, result = straight_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, list((run_dir / "wandb").rglob("*"))
    data = files[0].read_bytes()
    for key in (b"train/loss", b"train/lr", b"val/perplexity"):
        assert key in data
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert WANDB_SECRET.encode() not in path.read_bytes(), path
    assert WANDB_SECRET not in result.stdout + result.stderr


def test_finished_run_exits_zero_without_training(straight_run, debug_artifacts):
    run_dir, _ = straight_run
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_pretrain(debug_artifacts, run_dir.parent)
    assert "already reached" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_kill_and_resume_gives_bitwise_identical_losses(straight_run, debug_artifacts, tmp_path):
    """SIGKILL rank 0 after step 23, resume from the last checkpoint (the odd step 21, one that no eval or
    schedule boundary lines up with): every step, across the batch growth at step 26, equals the uninterrupted
    run."""
    checkpoint_every = 7
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "pretrain", "+experiment=debug",
        f"paths.artifacts={debug_artifacts}", f"paths.runs={runs}",
        f"train.checkpoint_every_steps={checkpoint_every}",
    ]  # fmt: skip
    env = dict(os.environ, **{KILL_AT_STEP: "23"})
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    assert max(step_losses(runs / "debug")) == 23
    run_pretrain(debug_artifacts, runs, f"train.checkpoint_every_steps={checkpoint_every}")
    resumed = [m["step"] for m in read_metrics(runs / "debug") if "train/loss" in m]
    assert resumed == list(range(1, 41)), "a step is missing or duplicated in the log"
    assert step_losses(runs / "debug") == step_losses(straight_run[0])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(straight_run, debug_artifacts, tmp_path):
    """The broken newest checkpoint is set aside, so retention keeps the good ones the resumed run writes (it
    would otherwise count as the newest and, with keep_checkpoints=1, leave only itself)."""
    runs = tmp_path / "runs"
    run_pretrain(debug_artifacts, runs, "train.stop_after_steps=20")
    checkpoints = sorted((runs / "debug" / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000010", "step_00000020"]
    newest = checkpoints[-1]
    victim = max((p for p in newest.rglob("*.pt") if "rng" not in p.name), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = run_pretrain(
        debug_artifacts,
        runs,
        "train.checkpoint_every_steps=5",
        "train.keep_checkpoints=1",
        "train.stop_after_steps=6",
    )
    assert "step_00000020 is broken" in result.stderr and "falling back" in result.stderr
    assert "resumed from" in result.stderr and "step_00000010" in result.stderr
    assert [p.name for p in (runs / "debug" / "broken_checkpoints").iterdir()] == ["step_00000020"]
    assert [p.name for p in (runs / "debug" / "checkpoints").glob("step_*")] == ["step_00000016"]
    # The log is cut back to step 10 at the resume; steps 11-16, trained again, are the uninterrupted run's.
    straight = step_losses(straight_run[0])
    assert step_losses(runs / "debug") == {step: straight[step] for step in range(1, 17)}


def test_ctrl_c_is_forwarded_to_every_rank(debug_artifacts, tmp_path):
    """The local launcher passes SIGINT on; no rank is left behind."""
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
           f"paths.runs={tmp_path}", "train.total_tokens=100000000"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3 |" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    shutil.rmtree(tmp_path, ignore_errors=True)
