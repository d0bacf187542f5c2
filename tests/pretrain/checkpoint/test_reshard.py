"""Resume on another number of ranks: real ZeRO-3 gloo ranks on CPU, DeepSpeed's universal checkpoint between.

* Engine level (tests/pretrain/checkpoint/reshard_probe.py): the fp32 master weights and both Adam moments gathered after
  the load equal those saved, bitwise, for 2 -> 1, 1 -> 4 and 4 -> 2 ranks; so do every sub-group's Adam step
  and every parameter group's hyperparameters (DeepSpeed 0.19 gets both wrong unless repaired). The save after
  each such load is a complete normal checkpoint, which the next hop resumes at yet another world size.
* Trainer level: a run moved 2 -> 1 -> 2 ranks, across the batch-growth step, reads the same global samples
  as an uninterrupted run, its per-step losses agree within 1e-3 relative (fp32; reductions differ), and it
  finishes at the same step and token count as one wandb run.
* A conversion killed at any moment leaves either nothing usable or a complete copy, never a partial one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import reshard
from tests.helpers import ROOT, read_metrics, run_pretrain, step_losses

pytestmark = pytest.mark.slow

PROBE = ROOT / "tests" / "pretrain" / "checkpoint" / "reshard_probe.py"


def probe(ranks: int, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
           str(PROBE), *args]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def assert_same_state(saved: dict, loaded: dict) -> None:
    assert saved["tensors"].keys() == loaded["tensors"].keys()
    unequal = [k for k, t in saved["tensors"].items() if not torch.equal(t, loaded["tensors"][k])]
    assert not unequal, unequal[:5]
    assert loaded["steps"] == saved["steps"] and len(set(loaded["steps"])) == 1
    assert loaded["groups"] == saved["groups"]
    assert [g["weight_decay"] for g in loaded["groups"]] == [0.1, 0.0]


def test_optimizer_state_survives_changes_of_world_size_bitwise(tmp_path):
    """2 ranks save; 1 rank resumes and saves; 4 ranks resume from that and save; 2 ranks resume from that."""
    run = tmp_path / "run"
    probe(2, "save", "--dir", str(run), "--steps", "3", "--out", str(tmp_path / "saved-3.pt"))
    for step, (before, after) in enumerate([(2, 1), (1, 4), (4, 2)], start=3):
        log = probe(after, "load", "--dir", str(run), "--out", str(tmp_path / f"loaded-{step}.pt"),
                    "--then-save", str(tmp_path / f"saved-{step + 1}.pt"))  # fmt: skip
        assert f"written by {before} ranks, this run has {after}: converted in" in log
        assert_same_state(
            torch.load(tmp_path / f"saved-{step}.pt"), torch.load(tmp_path / f"loaded-{step}.pt")
        )
        # The save after a universal load is a normal, complete checkpoint of `after` ranks.
        newest = run / "checkpoints" / f"step_{step + 1:08d}"
        assert (newest / "COMMITTED").is_file()
        assert (
            len(list(newest.glob("*model_states.pt"))) == after == len(list(newest.glob("*optim_states.pt")))
        )
    assert torch.load(tmp_path / "loaded-5.pt")["steps"][0] == 5.0  # one Adam step per optimizer step


def test_a_run_moved_across_world_sizes_is_the_same_run(debug_run, debug_artifacts, tmp_path):
    """2 ranks to step 14, 1 rank to step 26 (the batch grows at 26), 2 ranks to the end at step 40."""
    runs = tmp_path / "runs"
    run_pretrain(debug_artifacts, runs, "train.stop_after_steps=14")
    moved = run_pretrain(debug_artifacts, runs, "train.local_processes=1", "train.stop_after_steps=12")
    assert "written by 2 ranks, this run has 1: converted in" in moved.stderr
    back = run_pretrain(debug_artifacts, runs)
    assert "written by 1 ranks, this run has 2: converted in" in back.stderr

    ours, straight = read_metrics(runs / "debug"), read_metrics(debug_run)
    steps = [m for m in ours if "train/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 41))
    reference = {m["step"]: m for m in straight if "train/loss" in m}
    for m in steps:
        ref = reference[m["step"]]
        # the same global samples: the loader position and the batch are those of the uninterrupted run
        assert (m["train/samples"], m["train/tokens"], m["train/batch_tokens"]) == (
            ref["train/samples"], ref["train/tokens"], ref["train/batch_tokens"],
        )  # fmt: skip
        assert m["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-3), m["step"]
    assert {m["train/grad_accum"] for m in steps if 15 <= m["step"] <= 26} == {2.0, 4.0}  # 1 rank
    assert max(step_losses(runs / "debug")) == 40
    run_id = (runs / "debug" / "wandb_run_id").read_text().strip()
    assert {p.name.rsplit("-", 1)[-1] for p in (runs / "debug" / "wandb").glob("offline-run-*")} == {run_id}


def test_a_killed_conversion_is_never_used_half_done(tmp_path):
    run = tmp_path / "run"
    probe(2, "save", "--dir", str(run), "--steps", "1", "--out", str(tmp_path / "saved.pt"))
    checkpoint = run / "checkpoints" / "step_00000001"
    reference = tmp_path / "reference"
    # The first kills land at set points of the writing (seen on disk), the others at random moments timed from
    # when the process says its imports are done, within the time one whole conversion took: neither the
    # imports' time nor the machine's speed (or its load) decides whether a kill lands inside a conversion.
    script = (
        "import sys; from pathlib import Path; import deepspeed.checkpoint.ds_to_universal; "
        "from pretrain.checkpoint import reshard; print('converting', flush=True); "
        "reshard.convert(Path(sys.argv[1]), Path(sys.argv[2]))"
    )

    def start(directory: Path) -> tuple[subprocess.Popen, float]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(directory), str(checkpoint)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        while (line := proc.stdout.readline()) and line.strip() != "converting":
            pass
        assert line, "the conversion process ended before it began converting"
        return proc, time.monotonic()

    proc, began = start(reference)
    assert proc.wait() == 0
    whole = time.monotonic() - began
    expected = files_of(reshard.committed_copy(reference, checkpoint.name, checkpoint))
    rng = random.Random(11)
    outcomes = set()

    def writing(proc: subprocess.Popen, min_files: int) -> bool:
        """This process's staging directory exists and holds at least `min_files` files."""
        staging = run / "universal" / f".staging-{proc.pid}"
        return staging.is_dir() and sum(1 for f in staging.rglob("*") if f.is_file()) >= min_files

    for trial in range(6):
        proc, began = start(run)
        if trial < 3:  # at set points of the writing: as the staging directory appears, then mid-write
            while proc.poll() is None and not writing(proc, min_files=(0, 1, 8)[trial]):
                time.sleep(0.001)
        else:  # at random moments within (and, for the last ones, around the end of) a whole conversion
            time.sleep(
                max(0.0, began + rng.uniform(0.0, 0.8 if trial < 5 else 1.5) * whole - time.monotonic())
            )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = reshard.committed_copy(run, checkpoint.name, checkpoint)
        if found is None:
            outcomes.add("none")
            continue
        assert files_of(found) == expected, "a committed universal copy differs from a complete conversion"
        outcomes.add("complete")
        reshard.prune(run, keep=set())  # start the next trial from nothing again
    assert "none" in outcomes, "no kill landed inside a conversion"
    assert files_of(reshard.convert(run, checkpoint)[0]) == expected  # converts again after an interruption


def files_of(copy: Path) -> dict[str, int]:
    """Every file of a universal copy with its size, but the commit marker (which names the source path)."""
    return {
        str(p.relative_to(copy)): p.stat().st_size
        for p in copy.rglob("*")
        if p.is_file() and p.name != reshard.MARKER
    }
