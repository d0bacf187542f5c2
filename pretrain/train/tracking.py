"""wandb and the local metrics log: rank 0 only, one wandb run id per run name, no secrets.

The run id is stored in `runs/<name>/wandb_run_id` the first time a run starts, and every restart (a resume, a
requeued Slurm job) reuses it with `resume="allow"`, so one run name is one wandb run. The config is logged
from the typed dataclasses, which hold no credentials; wandb reads WANDB_API_KEY from the environment itself,
and this module never copies the environment anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data.log import get_logger

log = get_logger(__name__)

SECRET_MARKERS = ("api_key", "apikey", "token_secret", "password", "secret")


def scrub(value: Any) -> Any:
    """Drop any mapping key that looks like a credential (defence in depth: our configs hold none)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not any(m in str(k).lower() for m in SECRET_MARKERS)}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id: read from the run directory, or created once and stored there."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id)
    os.replace(tmp, path)
    return run_id


class RunTracker:
    """Per-step metrics to wandb (online, offline or disabled) and to `metrics.jsonl` in the run directory."""

    def __init__(
        self, config: Any, run_dir: Path, run_id: str, *, mode: str, project: str, entity: str | None
    ):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._wandb = None
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=project,
                entity=entity,
                id=run_id,
                name=run_dir.name,
                resume="allow",
                mode=mode,
                dir=str(run_dir),
                config=scrub(asdict(config)),
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
            log.info("wandb run %s (%s) in %s", run_id, mode, run_dir / "wandb")

    def truncate_after(self, step: int) -> None:
        """Drop logged steps beyond `step` after a resume, so the log has no duplicated step."""
        if not self.metrics_path.is_file():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if (entry := _entry(line)) is not None and entry.get("step", 0) <= step
        ]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _entry(line: str) -> dict | None:
    """One logged line, or None for a blank line or one torn by a crash mid-write (it is dropped, not fatal)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def console_line(metrics: dict[str, float], step: int) -> str:
    """The log line of a step's metrics: the headline numbers of a training step, or every metric of another."""
    if "train/loss" not in metrics:
        return f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return (
        f"step {step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e} | grad "
        f"{metrics['train/grad_norm']:.3f} | batch {int(metrics['train/batch_tokens'])} | "
        f"{metrics.get('perf/tokens_per_s', float('nan')):.0f} tok/s | tokens {int(metrics['train/tokens'])} "
        f"({int(metrics['train/target_tokens_total'])} targets)"
    )
