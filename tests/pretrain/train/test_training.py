"""The real thing end to end: `python -m pretrain +experiment=debug`, 2 CPU ranks, DeepSpeed ZeRO-3 over gloo.

The debug run is 40 optimizer steps: 25 of 512 tokens, then the batch grows to 1024 tokens (gradient
accumulation 1 -> 2), with checkpoints every 10 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data.loader import IGNORE_INDEX, GlobalBatchLoader
from data.mixture import MixtureDataset
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import find_checkpoint
from pretrain.config import compose_pretrain_config
from pretrain.schedule import LRSchedule
from pretrain.train.faults import KILL_AT_STEP
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
    """The local launcher passes SIGINT on; no rank is left behind.

    Each rank that gets SIGINT dies of KeyboardInterrupt, which torch's distributed error handler prints under
    that rank's prefix; a rank stopped any other way (the launcher's SIGKILL) prints nothing. 1M tokens stay
    within the debug corpus's repetition cap, so the run really trains until the signal. The launcher starts
    with SIGINT ignored, as a script's `cmd &` starts it: the ranks must still act on the SIGINT it forwards.
    The output goes to a file, not a pipe, so a rank that outlives the launcher cannot block the test.
    """
    cmd = [sys.executable, "-m", "pretrain", "+experiment=debug", f"paths.artifacts={debug_artifacts}",
           f"paths.runs={tmp_path / 'runs'}", "train.total_tokens=1000000"]  # fmt: skip
    log_path = tmp_path / "output.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    deadline = time.monotonic() + 300
    while "step 3 |" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "step 3 |" in log_path.read_text(), log_path.read_text()[-6000:]
    ranks = psutil.Process(proc.pid).children()
    assert sorted(int(p.environ()["RANK"]) for p in ranks) == [0, 1]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()  # the launcher did not stop: fail below, leaving nothing running
        proc.wait()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    survivors = [p.pid for p in alive if _running(p)]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    output = log_path.read_text()
    assert proc.returncode != 0
    assert not survivors, f"ranks {survivors} outlived the launcher"
    for rank in (0, 1):
        assert f"[rank{rank}]: KeyboardInterrupt" in output, output[-6000:]
    shutil.rmtree(tmp_path, ignore_errors=True)


def _running(proc: psutil.Process) -> bool:
    """An orphaned rank that was stopped may linger as a zombie until init reaps it: that is not running."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_target_tokens_are_counted_apart_from_slots(straight_run, debug_artifacts):
    """`train/tokens` counts slots (sequences x seq_len); `train/target_tokens_total` counts the labels that are
    not masked, which an independent pass of the loader over the same batches counts again."""
    run_dir, _ = straight_run
    cfg = compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"])
    tok = load_tokenizer(cfg.tokenizer.dir)[1]
    seq_len = cfg.data.packing.seq_len
    dataset = MixtureDataset.from_tokenizer(cfg.data, tok, planned_samples=cfg.train.total_tokens // seq_len)
    loader = GlobalBatchLoader(dataset, rank=0, world_size=1)
    slots = targets = 0
    for m in (m for m in read_metrics(run_dir) if "train/loss" in m):
        batch = loader.next_batch(int(m["train/batch_tokens"]) // seq_len)
        slots += batch["labels"].numel()
        targets += int((batch["labels"] != IGNORE_INDEX).sum())
        assert (m["train/tokens"], m["train/target_tokens_total"]) == (slots, targets), m["step"]
    state = find_checkpoint(run_dir).state
    assert (state["tokens"], state["target_tokens"]) == (slots, targets) == (28160, targets)
    # Masked: padding and the label at each document boundary. The embedded documents mostly outgrow a 64-token
    # sequence, so few slots are masked here (4 of 28,160 when this was written), but never none.
    assert 0 < slots - targets < 0.2 * slots, (slots, targets)
