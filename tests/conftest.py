"""Shared fixtures: one prepared debug corpus per session, and a helper that runs the real 2-rank trainer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import WANDB_SECRET, run_pretrain


@pytest.fixture(scope="session")
def debug_artifacts(tmp_path_factory) -> Path:
    """Tokenizer and shards of the embedded corpus under the debug experiment, built once per session."""
    from data.prepare import ensure_data
    from pretrain.config import compose_pretrain_config

    artifacts = tmp_path_factory.mktemp("artifacts")
    ensure_data(
        compose_pretrain_config(["+experiment=debug", f"paths.artifacts={artifacts}"]).data_pipeline()
    )
    return artifacts


@pytest.fixture(scope="session")
def debug_run_output(debug_artifacts, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted `python -m pretrain +experiment=debug` (2 ranks, 40 steps) shared by the tests that
    only read it; WANDB_API_KEY is set to a sentinel that must never be written anywhere."""
    runs = tmp_path_factory.mktemp("runs")
    result = run_pretrain(debug_artifacts, runs, env={"WANDB_API_KEY": WANDB_SECRET})
    return runs / "debug", result


@pytest.fixture(scope="session")
def debug_run(debug_run_output) -> Path:
    return debug_run_output[0]
