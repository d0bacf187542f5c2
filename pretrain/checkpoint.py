"""Atomic, resumable checkpoints in `runs/<name>/checkpoints/` (DESIGN contracts 1, 5 and 7).

A checkpoint is the DeepSpeed engine state (sharded model and optimizer, written by every rank), plus the
trainer state (tokens, step, batch schedule, loader position, wandb run id) and every rank's RNG. It counts only
once `COMMITTED` is written, by rank 0, after a barrier that every rank reaches only when its own files are on
disk. Loading takes the newest committed checkpoint and falls back to older ones when it is broken.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data.atomic_io import atomic_write_text
from data.log import get_logger

log = get_logger(__name__)

MARKER = "COMMITTED"
STATE_FILE = "trainer_state.json"


def _fsync_tree(directory: Path) -> None:
    """Flush this rank's files so the commit marker never precedes the data it vouches for."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG as tensors only, so it loads with `weights_only=True`."""
    version, words, _ = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words, dtype=torch.int64),
        "python_version": torch.tensor(version, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Save, commit, prune and find checkpoints of one run."""

    def __init__(
        self,
        run_dir: str | Path,
        keep: int,
        rank: int,
        barrier: Callable[[], None],
        all_ranks_ok: Callable[[bool], bool],
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.all_ranks_ok = all_ranks_ok

    # -- listing ----------------------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / MARKER).is_file())

    def _valid(self, path: Path) -> str | None:
        """Why a committed checkpoint cannot be used, or None when every recorded file is present and whole."""
        try:
            listing = json.loads((path / MARKER).read_text())
        except (OSError, json.JSONDecodeError) as err:
            return f"unreadable commit marker ({err})"
        for name, size in listing.get("files", {}).items():
            file = path / name
            if not file.is_file():
                return f"missing {name}"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, expected {size}"
        return None

    # -- saving -----------------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every rank writes its shards and RNG; after a barrier rank 0 writes the marker and prunes."""
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an uncommitted leftover of an interrupted save of this very step
        self.barrier()
        engine.save(str(self.root), tag, client_state={"trainer_state_step": step})
        torch.save(rng_state(), path / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0:
            atomic_write_text(path / STATE_FILE, json.dumps(trainer_state, indent=2, sort_keys=True))
        _fsync_tree(path)
        self.barrier()
        if self.rank == 0:
            files = {
                str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()
            }
            atomic_write_text(path / MARKER, json.dumps({"step": step, "files": files}, indent=1))
            self._prune()
            log.info("checkpoint %s committed (%d files)", path, len(files))
        self.barrier()
        return path

    def _prune(self) -> None:
        done = self.committed()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # Uncommitted directories older than the newest commit are debris of interrupted saves.
        newest = done[-1].name if done else ""
        for stray in self.root.iterdir():
            if stray.is_dir() and not (stray / MARKER).exists() and stray.name < newest:
                shutil.rmtree(stray, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------------
    def load_latest(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest usable checkpoint into `engine` and this rank's RNG; None when there is none.

        A broken newest checkpoint (missing or truncated file, failed load) falls back to the previous one with
        a warning. Every rank reaches the same decision because they all check the same files.
        """
        candidates = self.committed()
        for path in reversed(candidates):
            problem = self._valid(path)
            state = None
            if problem is None:
                try:
                    engine.load(str(self.root), path.name)
                    state = json.loads((path / STATE_FILE).read_text())
                    set_rng_state(torch.load(path / f"rng_rank{self.rank:05d}.pt", weights_only=True))
                except Exception as err:  # a corrupt file that DeepSpeed or torch could not read
                    problem = f"load failed on rank {self.rank}: {type(err).__name__}: {err}"
            if self.all_ranks_ok(problem is None) and state is not None:
                log.info("resumed from %s (step %d, %d tokens)", path, state["step"], state["tokens"])
                return state
            log.warning(
                "checkpoint %s is broken (%s); falling back to the previous one",
                path,
                problem or "on another rank",
            )
        if candidates:
            raise RuntimeError(
                f"every checkpoint in {self.root} is broken; move the directory away to start the run afresh"
            )
        return None
