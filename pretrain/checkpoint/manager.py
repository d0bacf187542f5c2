"""Saving, committing, pruning and resuming the checkpoints of a run, on every rank of the trainer.

A checkpoint is the DeepSpeed engine state (sharded model and optimizer, written by every rank), plus the
trainer state (tokens, step, batch schedule, loader position, wandb run id), the config it was written with
and every rank's RNG. The commit protocol:

1. every rank writes its own files: its DeepSpeed files (named by the engine, `checkpoint_files`), its RNG
   file, and on rank 0 the trainer state and config;
2. every rank fsyncs only those files (not the whole directory: on a parallel filesystem each rank flushing
   every rank's files costs world size times the metadata traffic) and reports their names and sizes to all
   ranks through one gather, which is also the barrier that ends the writing;
3. rank 0 checks that every rank reported, that each rank's set is complete (each file its writer saw, its RNG
   file, rank 0's trainer state) and that every file is on disk with the size its writer reported; only then
   does it write `COMMITTED`, which records the world size, each rank's files and every file with its size;
4. a second gather hands rank 0's verdict to every rank, so an incomplete set fails the save loudly on every
   rank, naming the rank and the file, and leaves no marker.

A checkpoint counts only once `COMMITTED` exists; a save killed at any moment leaves either a committed
checkpoint or an uncommitted directory that readers ignore and the next commit removes.
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

import pretrain.checkpoint.reshard as reshard
from data.atomic_io import atomic_write_text, fsync_dir
from data.log import get_logger
from pretrain.checkpoint.run_dir import (
    BROKEN_DIR,
    CONFIG_FILE,
    MARKER,
    STATE_FILE,
    CheckpointError,
    RunDir,
    checkpoint_problem,
    checkpoint_world_size,
    rng_file,
    tag_for,
)

log = get_logger(__name__)


def flush_own_files(directory: Path, names: list[str]) -> dict[str, int | None]:
    """Flush the files this rank wrote, so the commit marker never precedes the data it vouches for, and return
    their sizes as this rank sees them (None for a file it cannot open: reported, not raised, so that every
    rank still reaches the gather and the save fails on all of them instead of hanging the others)."""
    sizes: dict[str, int | None] = {}
    for name in names:
        try:
            fd = os.open(directory / name, os.O_RDONLY)
        except OSError:
            sizes[name] = None
            continue
        try:
            os.fsync(fd)
            sizes[name] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    return sizes


def incomplete_set_problem(directory: Path, reports: list[Any], world_size: int) -> str | None:
    """Why the files the ranks reported do not make a complete checkpoint in `directory`, or None.

    `reports[r]` is rank r's {"rank": r, "files": {name: size or None}}. Complete means: one report from each of
    the `world_size` ranks, each naming its RNG file (and rank 0 the trainer state), no file claimed by two
    ranks, every file seen whole by its writer, and on disk now with the size its writer reported.
    """
    if len(reports) != world_size:
        return f"{len(reports)} ranks reported their files, expected {world_size}"
    owner: dict[str, int] = {}
    for rank, report in enumerate(reports):
        if not isinstance(report, dict) or report.get("rank") != rank:
            return f"rank {rank} sent no report of its files"
        files: dict[str, int | None] = report["files"]
        required = [rng_file(rank)] + ([STATE_FILE] if rank == 0 else [])
        for name in required:
            if name not in files:
                return f"rank {rank} did not write {name}"
        for name, size in files.items():
            if name in owner:
                return f"{name} was written by both rank {owner[name]} and rank {rank}"
            owner[name] = rank
            if size is None:
                return f"rank {rank} could not open its own file {name} after writing it"
            try:
                on_disk = (directory / name).stat().st_size
            except FileNotFoundError:
                return f"rank {rank}'s file {name} is missing"
            if on_disk != size:
                return f"rank {rank}'s file {name} has {on_disk} bytes on disk, its writer reported {size}"
    return None


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


def _single_process_gather(obj: Any) -> list[Any]:
    return [obj]


class CheckpointManager:
    """Save, commit, prune and resume the checkpoints of one run, on every rank."""

    def __init__(
        self,
        run_dir: str | Path,
        keep: int,
        rank: int,
        barrier: Callable[[], None],
        all_ranks_ok: Callable[[bool], bool],
        all_gather: Callable[[Any], list[Any]] | None = None,
        config_text: str = "",
        world_size: int = 1,
        seed: int = 0,
    ):
        """`barrier`, `all_ranks_ok` and `all_gather` (every rank's object, in rank order, on every rank) are the
        trainer's collectives (`pretrain.train.engine`); a single process may leave out `all_gather`."""
        if all_gather is None:
            if world_size != 1:
                raise ValueError(
                    f"CheckpointManager: world_size={world_size} needs all_gather (pretrain.train.engine."
                    "all_gather_object) so that rank 0 commits only a checkpoint every rank reported complete"
                )
            all_gather = _single_process_gather
        self.all_gather = all_gather
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
        """Save and commit checkpoint `step` on every rank (the protocol is in the module docstring); raises
        CheckpointError on every rank, and commits nothing, when a rank's set of files is incomplete."""
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an uncommitted leftover of an interrupted save of this very step
        self.barrier()
        engine.save(str(self.root), tag, client_state={"trainer_state_step": step})
        own = [*engine.checkpoint_files(), rng_file(self.rank)]
        torch.save(rng_state(), path / rng_file(self.rank))
        if self.rank == 0:
            atomic_write_text(path / STATE_FILE, json.dumps(trainer_state, indent=2, sort_keys=True))
            own.append(STATE_FILE)
            if self.config_text:
                atomic_write_text(path / CONFIG_FILE, self.config_text)
                own.append(CONFIG_FILE)
        reports = self.all_gather({"rank": self.rank, "files": flush_own_files(path, own)})
        problem = None
        if self.rank == 0:
            problem = incomplete_set_problem(path, reports, self.world_size)
            if problem is None:
                self._commit(path, step, reports)
        verdict = self.all_gather(problem)[0]
        if verdict is not None:
            raise CheckpointError(f"checkpoint {path} was not committed: {verdict}")
        return path

    def _commit(self, path: Path, step: int, reports: list[dict[str, Any]]) -> None:
        """Rank 0: write the marker for a complete set of files, then prune."""
        ranks = {str(report["rank"]): report["files"] for report in reports}
        files = {name: size for report in reports for name, size in report["files"].items()}
        marker = {
            "step": step,
            "world_size": self.world_size,
            "ranks": ranks,
            "files": dict(sorted(files.items())),
        }
        # The directory entries of every rank's files are durable before the marker that vouches for them.
        fsync_dir(path)
        atomic_write_text(path / MARKER, json.dumps(marker, indent=1))
        self._prune()
        log.info("checkpoint %s committed (%d files from %d ranks)", path, len(files), self.world_size)

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
        (`pretrain.checkpoint.reshard`), converted by rank 0 on first use. A broken newest checkpoint (missing or truncated
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
        try:  # the marker's count, never a guess from the files present
            written_by = checkpoint_world_size(path)
        except (OSError, ValueError) as err:
            return f"unreadable commit marker ({err})"
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
        """This rank's RNG from the checkpoint; a rank that did not exist when it was written (a resume on more
        ranks) gets one derived from (seed, step, rank). A rank that did exist must find its own file: deriving
        one would silently break the exact resume, so a missing file makes the checkpoint broken."""
        own = path / rng_file(self.rank)
        if self.rank < checkpoint_world_size(path) or own.is_file():
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
