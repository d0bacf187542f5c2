"""Reading checkpoints: every reader takes the same usable checkpoint, skips a broken one the same way as the
trainer's resume, and reads the config each checkpoint was written with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.checkpoint import (
    CONFIG_FILE,
    MARKER,
    CheckpointError,
    check_state_dict,
    find_checkpoint,
    read_config,
)
from pretrain.config import ModelConfig
from pretrain.export import main as export_main
from pretrain.model import Transformer
from tests.helpers import ROOT


def test_uncommitted_checkpoint_is_refused_with_a_clear_error(tmp_path, capsys):
    partial = tmp_path / "runs" / "r" / "checkpoints" / "step_00000010"
    partial.mkdir(parents=True)
    (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(CheckpointError, match=f"not committed .*no {MARKER}"):
        find_checkpoint(partial)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(partial)])
    assert exit_info.value.code == 2
    assert "is not committed" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        find_checkpoint(tmp_path / "runs" / "r")


def test_weights_that_do_not_fit_the_config_are_refused():
    cfg = ModelConfig(name="t", vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=8)
    state = Transformer(cfg).state_dict()
    check_state_dict(state, cfg)
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(25, 16)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        check_state_dict(state, cfg)


@pytest.fixture
def run_copy(debug_run, tmp_path) -> Path:
    """A copy of the shared debug run that a test may damage."""
    copy = tmp_path / "runs" / debug_run.name
    shutil.copytree(debug_run, copy, ignore=shutil.ignore_patterns("wandb", "hf", "eval"))
    return copy


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_export_and_evaluate_skip_a_broken_newest_checkpoint_and_say_so(run_copy, tmp_path):
    newest, previous = sorted((run_copy / "checkpoints").glob("step_*"))[::-1][:2]
    victim = max((p for p in newest.rglob("*.pt") if "rng" not in p.name), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert find_checkpoint(run_copy).path == previous

    exported = _cli("pretrain.export", str(run_copy), f"out={tmp_path / 'hf'}")
    assert f"{newest} is broken" in exported.stderr and victim.name in exported.stderr
    assert f"exported {previous}" in exported.stderr

    evaluated = _cli("pretrain.evaluate", str(run_copy), "sequences=2")
    assert f"{newest} is broken" in evaluated.stderr
    assert f'"checkpoint": "{previous}"' in evaluated.stdout


@pytest.mark.slow
def test_each_checkpoint_keeps_the_config_it_was_written_with(run_copy, tmp_path):
    """A restart rewrites the run's config.yaml; a checkpoint saved before it still reads its own."""
    checkpoint = find_checkpoint(run_copy)
    own = checkpoint.path / CONFIG_FILE
    assert own.is_file() and read_config(own) == read_config(run_copy / CONFIG_FILE)
    changed = OmegaConf.load(run_copy / CONFIG_FILE)
    changed.model.dim = 2 * changed.model.dim  # a later start of the run with another model
    (run_copy / CONFIG_FILE).write_text(OmegaConf.to_yaml(changed))
    assert checkpoint.config().model.dim == read_config(own).model.dim != changed.model.dim
    _cli(
        "pretrain.export", str(run_copy), f"out={tmp_path / 'hf'}"
    )  # the weights fit the checkpoint's config
