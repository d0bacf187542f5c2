"""A run directory and its checkpoints: writing, listing, validating and reading them, in one place.

`runs/<name>/` holds everything of one run, so a requeued job finds its checkpoints and its wandb run id:

    config.yaml          the composed config of the newest start (each checkpoint keeps its own copy)
    model_summary.json   parameters, per-rank shares, world size, the weight-decayed parameters
    deepspeed.json       the exact DeepSpeed config the engine was built with
    checkpoints/step_N/  DeepSpeed's shards, trainer_state.json, rng_rankR.pt, config.yaml, COMMITTED

A checkpoint counts only once `COMMITTED` is written, by rank 0, after a barrier that every rank reaches only
when its own files are on disk; the marker lists every file with its size. Every reader (the trainer's resume,
export, evaluate, generate) takes the newest committed checkpoint whose files match that list and that loads,
and says which broken one it skipped. Our own loads use `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data.atomic_io import atomic_write_json, atomic_write_text
from data.log import get_logger
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.model import Transformer

log = get_logger(__name__)

MARKER = "COMMITTED"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "model_summary.json"
DEEPSPEED_FILE = "deepspeed.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says what to do."""


# -- the run directory ------------------------------------------------------------------------------------


class RunDir:
    """The paths of one run directory, and the writes of its small files (all atomic)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def file(self, name: str) -> Path:
        return self.path / name

    def is_run(self) -> bool:
        """A run directory, not one of its checkpoints (which hold a config.yaml of their own)."""
        if self.path.parent.name == "checkpoints" or (self.path / MARKER).exists():
            return False
        return self.checkpoints.is_dir() or self.file(CONFIG_FILE).is_file()

    def committed(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and (p / MARKER).is_file())

    def write_json(self, name: str, obj: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file(name), obj)

    def write_config(self, cfg: PretrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.file(CONFIG_FILE), config_yaml(cfg))

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.file(name).read_text())
        except (OSError, ValueError):
            return None


def config_yaml(cfg: PretrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def read_config(path: str | Path) -> PretrainConfig:
    """A stored `config.yaml`, typed and validated like a freshly composed config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} made by `python -m pretrain`?")
    merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(path))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, PretrainConfig)
    config.validate()
    return config


# -- one checkpoint ---------------------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_problem(path: Path) -> str | None:
    """Why a committed checkpoint cannot be used, or None when every file its marker lists is present and whole."""
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


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint and the run it belongs to."""

    run_dir: Path
    path: Path

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def state(self) -> dict[str, Any]:
        """The trainer state saved with it (step, tokens, loader position, wandb id...)."""
        return json.loads((self.path / STATE_FILE).read_text())

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world_size(self) -> int:
        """How many ranks wrote it (one RNG file each)."""
        return len(list(self.path.glob("rng_rank*.pt")))

    def config(self) -> PretrainConfig:
        """The config this checkpoint was written with; the run's `config.yaml` for checkpoints that predate
        per-checkpoint configs."""
        own = self.path / CONFIG_FILE
        return read_config(own if own.is_file() else self.run_dir / CONFIG_FILE)


def find_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest usable committed checkpoint) or one checkpoint directory (committed, whole)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; pass a run directory (runs/<name>) or one of its checkpoints"
        )
    run = RunDir(path)
    if run.is_run():
        candidates = usable_checkpoints(run)
        if not candidates:
            raise CheckpointError(
                f"{path} has no committed checkpoint that is whole under {run.checkpoints}; train longer or "
                "wait for the first save (train.checkpoint_every_steps)"
            )
        return candidates[0]
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is not committed (no {MARKER} marker): its save was interrupted or is still "
            f"running, so its shards may be incomplete. Pass the run directory ({path.parent.parent}) to use the "
            "newest committed checkpoint"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is broken ({problem}); pass the run directory to use an older one"
        )
    return Checkpoint(run_dir=path.parent.parent, path=path)


def usable_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Committed checkpoints whose files are whole, newest first; each broken one is named in a warning."""
    usable = []
    for path in reversed(run.committed()):
        problem = checkpoint_problem(path)
        if problem is None:
            usable.append(Checkpoint(run_dir=run.path, path=path))
        else:
            log.warning("checkpoint %s is broken (%s); skipping it", path, problem)
    return usable


# -- reading the weights ----------------------------------------------------------------------------------


def consolidate(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every rank's ZeRO shards as one state dict on CPU (DeepSpeed's utility)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.info("consolidating %s", checkpoint.path)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays for our results
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    except Exception as err:
        raise CheckpointError(
            f"DeepSpeed could not consolidate {checkpoint.path}: {type(err).__name__}: {err}. Export reads ZeRO "
            "stage 1-3 checkpoints written by `python -m pretrain`; an older committed checkpoint may still work"
        ) from err
    return dict(state)


def newest_weights(path: str | Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The consolidated weights of `path` (see `find_checkpoint`). For a run directory a checkpoint that fails
    to consolidate is skipped, with a warning, for the previous one, as the trainer's resume does."""
    path = Path(path)
    if not RunDir(path).is_run():
        checkpoint = find_checkpoint(path)
        return checkpoint, consolidate(checkpoint)
    find_checkpoint(path)  # the clear error when there is none at all
    last_error: CheckpointError | None = None
    for checkpoint in usable_checkpoints(RunDir(path)):
        try:
            return checkpoint, consolidate(checkpoint)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            last_error = err
    assert last_error is not None
    raise last_error


def check_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Fail with the differing names and shapes when the weights do not fit the model config."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    got = {name: tuple(t.shape) for name, t in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or unexpected or wrong:
        shapes = [f"{n}: {got[n]} != {expected[n]}" for n in wrong[:5]]
        raise CheckpointError(
            f"the checkpoint's weights do not match the model config ({cfg.name}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes}; was its config.yaml edited after training?"
        )


def model_from_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Transformer:
    """Our Transformer holding `state` (checked against `cfg` first), on CPU, in eval mode."""
    check_state_dict(state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_trained(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, PretrainConfig, Checkpoint]:
    """The trained model of a run or checkpoint (eval mode), the config it was trained with, and which
    checkpoint was read."""
    checkpoint, state = newest_weights(path)
    cfg = checkpoint.config()
    model = model_from_state(state, cfg.model).to(device=device, dtype=dtype)
    log.info("loaded %s (step %d)", checkpoint.path, checkpoint.step)
    return model, cfg, checkpoint


# -- writing (every rank of the trainer) ------------------------------------------------------------------


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
    ):
        self.run = RunDir(run_dir)
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
        # Uncommitted directories older than the newest commit are debris of interrupted saves.
        newest = done[-1].name if done else ""
        for stray in self.root.iterdir():
            if stray.is_dir() and not (stray / MARKER).exists() and stray.name < newest:
                shutil.rmtree(stray, ignore_errors=True)

    def load_latest(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest usable checkpoint into `engine` and this rank's RNG; None when there is none.

        A broken newest checkpoint (missing or truncated file, failed load) falls back to the previous one with
        a warning. Every rank reaches the same decision because they all check the same files.
        """
        candidates = self.committed()
        for path in reversed(candidates):
            problem = checkpoint_problem(path)
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
