"""Saving, committing, pruning and resuming the checkpoints of a run, on every rank of the trainer.

A checkpoint is the DeepSpeed engine state (sharded model and optimizer, written by every rank), plus the
trainer state (tokens, step, batch schedule, loader position, wandb run id), the config it was written with
and every rank's RNG. It counts only once `COMMITTED` is written, by rank 0, after a barrier that every rank
reaches only when its own files are on disk.
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
from pretrain import reshard
from pretrain.checkpoint.run_dir import (
    BROKEN_DIR,
    CONFIG_FILE,
    MARKER,
    STATE_FILE,
    RunDir,
    checkpoint_problem,
    tag_for,
)

log = get_logger(__name__)


def _fsync_tree(directory: Path) -> None:
    """Flush this rank's files so the commit marker never precedes the data it vouches for. Another rank may be
    writing into the same directory at the same time: a temporary file it renames away between the listing and
    the open is skipped (its writer flushes it before the rename)."""
    for path in directory.rglob("*"):
        if path.is_file():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
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


class CheckpointManager:
    """Save, commit, prune and resume the checkpoints of one run, on every rank."""

    def __init__(
        self,
        run_dir: str | Path,
        keep: int,
        rank: int,
        barrier: Callable[[], None],
        all_ranks_ok: Callable[[bool], bool],
        config_text: str = "",
        world_size: int = 1,
        seed: int = 0,
    ):
        self.run = RunDir(run_dir)
        self.world_size = world_size
        self.seed = seed
        self.root = self.run.checkpoints
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.all_ranks_ok = all_ranks_ok
        self.config_text = config_text

    def committed(self) -> list[Path]:
        return self.run.committed()

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
            if self.config_text:
                atomic_write_text(path / CONFIG_FILE, self.config_text)
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
        reshard.prune(self.run.path, keep={p.name for p in self.committed()})
        # Uncommitted directories older than the newest commit are debris of interrupted saves.
        newest = done[-1].name if done else ""
        for stray in self.root.iterdir():
            if stray.is_dir() and not (stray / MARKER).exists() and stray.name < newest:
                shutil.rmtree(stray, ignore_errors=True)

    def load_latest(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest usable checkpoint into `engine` and this rank's RNG; None when there is none.

        A checkpoint written by another number of ranks is loaded through its universal copy
        (`pretrain.reshard`), converted by rank 0 on first use. A broken newest checkpoint (missing or truncated
        file, failed load) falls back to the previous one with a warning. Every rank reaches the same decision
        because they all check the same files. The broken ones newer than the one resumed are moved to
        `runs/<name>/broken_checkpoints/`: left in place they would count as the newest, and retention would
        delete the good checkpoints the resumed run writes next.
        """
        candidates = self.committed()
        abandoned: list[Path] = []
        for path in reversed(candidates):
            state, problem = None, checkpoint_problem(path)
            if problem is None:
                problem = self.load_engine_state(engine, path)
            if problem is None:
                try:
                    state = json.loads((path / STATE_FILE).read_text())
                    self._restore_rng(path, state["step"])
                except Exception as err:
                    problem = f"load failed on rank {self.rank}: {type(err).__name__}: {err}"
            if self.all_ranks_ok(problem is None) and state is not None:
                log.info("resumed from %s (step %d, %d tokens)", path, state["step"], state["tokens"])
                if self.rank == 0:
                    self._set_aside(abandoned)
                return state
            log.warning(
                "checkpoint %s is broken (%s); falling back to the previous one",
                path,
                problem or "on another rank",
            )
            abandoned.append(path)
        if candidates:
            raise RuntimeError(
                f"every checkpoint in {self.root} is broken; move the directory away to start the run afresh"
            )
        return None

    def load_engine_state(self, engine: Any, path: Path, copy_name: str | None = None) -> str | None:
        """Load the committed checkpoint `path` (of this run or another) into `engine`; None, or what went wrong
        on this rank. A checkpoint of another world size goes through its universal copy in this run's
        directory (named `copy_name`, default its tag), converted by rank 0 while the others wait."""
        written_by = len(list(path.glob("rng_rank*.pt")))
        directory, tag, universal = path.parent, path.name, False
        if written_by != self.world_size:
            copy, problem = self._universal_copy(path, written_by, copy_name or path.name)
            if problem is not None:
                return problem
            directory, tag, universal = copy.parent, copy.name, True
        try:
            engine.load(str(directory), tag, universal=universal)
        except Exception as err:  # a corrupt file that DeepSpeed or torch could not read
            return f"load failed on rank {self.rank}: {type(err).__name__}: {err}"
        return None

    def _universal_copy(self, path: Path, written_by: int, name: str) -> tuple[Path, str | None]:
        """The universal copy of a checkpoint of `written_by` ranks, made by rank 0 while the others wait."""
        problem = None
        if self.rank == 0:
            try:
                copy, seconds, size = reshard.convert(self.run.path, path, name)
                verb = f"converted in {seconds:.1f} s" if seconds else "reusing its universal copy"
                log.info(
                    "checkpoint %s was written by %d ranks, this run has %d: %s (%.1f MB, %s)",
                    path.name, written_by, self.world_size, verb, size / 1e6, copy,
                )  # fmt: skip
            except Exception as err:
                problem = (
                    f"written by {written_by} ranks, this run has {self.world_size}, and converting it to a "
                    f"universal checkpoint failed ({type(err).__name__}: {err}); resume it with {written_by} "
                    "ranks, or fix the cause and start again"
                )
        if not self.all_ranks_ok(problem is None):
            return path, problem or "its universal conversion failed on rank 0"
        copy = reshard.committed_copy(self.run.path, name, path)
        if copy is None:
            return path, "its universal copy is not visible on this rank"
        return copy, None

    def _restore_rng(self, path: Path, step: int) -> None:
        """This rank's RNG from the checkpoint; a rank it has no file for gets a derived one."""
        own = path / f"rng_rank{self.rank:05d}.pt"
        if own.is_file():
            set_rng_state(torch.load(own, weights_only=True))
        else:
            reshard.derived_rng_state(self.seed, step, self.rank)

    def _set_aside(self, broken: list[Path]) -> None:
        if not broken:
            return
        aside = self.run.file(BROKEN_DIR)
        aside.mkdir(parents=True, exist_ok=True)
        for path in broken:
            target = aside / path.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            log.warning("moved the broken checkpoint %s to %s", path, target)
