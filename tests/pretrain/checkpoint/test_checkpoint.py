"""Reading checkpoints: every reader takes the same usable checkpoint, skips a broken one the same way as the
trainer's resume, and reads the config each checkpoint was written with."""

from __future__ import annotations

import json
import os
import shutil
import socket
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
    checkpoint_problem,
    checkpoint_world_size,
    find_checkpoint,
    read_config,
)
from pretrain.config import ModelConfig
from pretrain.evaluation.export import main as export_main
from pretrain.model.transformer import Transformer
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


def test_world_size_comes_from_the_marker_and_only_old_markers_count_rng_files(tmp_path):
    """One RNG file lost from a 2-rank checkpoint: the marker still says 2 ranks (so a resume on 2 ranks is no
    reshard) and names the missing file; a marker of the older format (no world size) counts RNG files."""
    new, old = tmp_path / "new", tmp_path / "old"
    for path in (new, old):
        path.mkdir()
        for rank in range(2):
            (path / f"rng_rank{rank:05d}.pt").write_bytes(b"12345")
    files = {"rng_rank00000.pt": 5, "rng_rank00001.pt": 5}
    ranks = {"0": {"rng_rank00000.pt": 5}, "1": {"rng_rank00001.pt": 5}}
    (new / MARKER).write_text(json.dumps({"step": 3, "world_size": 2, "ranks": ranks, "files": files}))
    (old / MARKER).write_text(json.dumps({"step": 3, "files": files}))
    assert checkpoint_world_size(new) == checkpoint_world_size(old) == 2
    (new / "rng_rank00001.pt").unlink()
    assert checkpoint_world_size(new) == 2
    assert checkpoint_problem(new) == "missing rng_rank00001.pt"
    (old / "rng_rank00001.pt").unlink()
    assert checkpoint_world_size(old) == 1


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


def _two_ranks(module: str, *args: str, timeout: int = 300) -> None:
    """Run `python -m module args` as the 2 ranks of a real gloo group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("DS_ACCELERATOR", "cpu")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    errors = [proc.communicate(timeout=timeout)[1] for proc in ranks]
    for proc, err in zip(ranks, errors, strict=True):
        assert proc.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def damaged_saves(tmp_path_factory) -> list[dict]:
    """What each rank of a real 2-rank job saw while files of its checkpoints went missing (commit_probe.py)."""
    base = tmp_path_factory.mktemp("commit")
    _two_ranks("tests.pretrain.checkpoint.commit_probe", "--dir", str(base / "run"), "--out", str(base))
    return [json.loads((base / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_marker_records_each_ranks_own_files_as_deepspeed_wrote_them(damaged_saves):
    marker = damaged_saves[0]["marker_1"]
    assert marker["world_size"] == 2
    # Oracle: the files DeepSpeed and the manager left on disk, split by the rank named in each file name.
    on_disk = damaged_saves[0]["files_on_disk_1"]
    assert set(marker["files"]) == set(on_disk)
    assert set(marker["ranks"]["1"]) == {
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank00001.pt",
    }
    assert set(marker["ranks"]["0"]) == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng_rank00000.pt",
        "trainer_state.json",
    }
    for rank in range(2):
        for name, size in marker["ranks"][str(rank)].items():
            assert marker["files"][name] == size > 0


@pytest.mark.slow
def test_a_rank_file_lost_before_the_commit_fails_the_save_on_every_rank(damaged_saves):
    for seen in damaged_saves:
        assert seen["committed_2"] is False and seen["committed_3"] is False
        assert "not committed: rank 1's file rng_rank00001.pt is missing" in seen["save_2"]
        assert (
            "rank 1's file zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes on disk" in seen["save_3"]
        )


@pytest.mark.slow
def test_a_lost_rng_file_of_a_committed_checkpoint_is_a_broken_checkpoint_not_a_reshard(damaged_saves):
    """Rank 1's RNG file of step 4 vanished after the commit: at the same world size that checkpoint is broken
    (deriving rank 1's RNG would silently break the exact resume), so both ranks fall back to step 1 (steps 2
    and 3 were never committed) without any universal conversion."""
    for rank, seen in enumerate(damaged_saves):
        assert seen["resumed_step"] == 1 and seen["consistent"] and seen["weights_step"] == 1.0, (rank, seen)
        assert seen["universal_dir"] is False
        assert seen["broken"] == ["step_00000004"]
