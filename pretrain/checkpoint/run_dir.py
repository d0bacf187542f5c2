"""A run directory and its checkpoints: where every file lives, which checkpoints count, and finding one.

`runs/<name>/` holds everything of one run, so a requeued job finds its checkpoints and its wandb run id:

    config.yaml          the composed config of the newest start (each checkpoint keeps its own copy)
    model_summary.json   parameters, per-rank shares, world size, the weight-decayed parameters
    deepspeed.json       the exact DeepSpeed config the engine was built with
    checkpoints/step_N/  DeepSpeed's shards, trainer_state.json, rng_rankR.pt, config.yaml, COMMITTED
    universal/step_N/    a checkpoint's universal copy, made when a run resumes on another world size
    broken_checkpoints/  checkpoints that failed to load and were set aside

A checkpoint counts only once `COMMITTED` is written, by rank 0, after every rank flushed and reported the files
it wrote and rank 0 found each rank's set complete on disk; the marker records the world size, each rank's files
and every file with its size. Every reader (the trainer's resume,
export, evaluate, generate) takes the newest committed checkpoint whose files match that list and that loads,
and says which broken one it skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data.atomic_io import atomic_write_json, atomic_write_text
from data.log import get_logger
from pretrain.config import PretrainConfig

log = get_logger(__name__)

MARKER = "COMMITTED"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "model_summary.json"
DEEPSPEED_FILE = "deepspeed.json"
BROKEN_DIR = "broken_checkpoints"


def rng_file(rank: int) -> str:
    """The name of rank `rank`'s RNG file in a checkpoint (zero-padded, so rank 1 never matches rank 10)."""
    return f"rng_rank{rank:05d}.pt"


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


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of checkpoint `path`: step, world_size, each rank's files ("ranks") and every file with
    its size ("files"); markers written before per-rank reports have only step and files."""
    return json.loads((path / MARKER).read_text())


def checkpoint_world_size(path: Path) -> int:
    """How many ranks wrote the committed checkpoint `path`: the marker says so; for a marker of the older format
    (without "world_size") the number of RNG files, one per rank, so old run directories still resume."""
    listing = read_marker(path)
    if "world_size" in listing:
        return int(listing["world_size"])
    return len(list(path.glob("rng_rank*.pt")))


def checkpoint_problem(path: Path) -> str | None:
    """Why a committed checkpoint cannot be used, or None when every file its marker lists is present and whole."""
    try:
        listing = read_marker(path)
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
        """How many ranks wrote it, as its commit marker records."""
        return checkpoint_world_size(self.path)

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
