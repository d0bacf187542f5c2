"""Helpers shared by the tests: run the real trainer as a user would, and read what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WANDB_SECRET = "sk-test-never-logged-0123456789"


def run_pretrain(
    artifacts: Path, runs: Path, *overrides: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m pretrain +experiment=debug ...` exactly as a user types it: 2 local ZeRO-3 ranks on CPU."""
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "+experiment=debug",
        f"paths.artifacts={artifacts}",
        f"paths.runs={runs}",
        *overrides,
    ]
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("RANK", None)
    result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """Each training step's logged metrics (the last record of a step a resume repeated)."""
    return {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}


def step_losses(run_dir: Path) -> dict[int, float]:
    return {step: m["train/loss"] for step, m in step_metrics(run_dir).items()}
