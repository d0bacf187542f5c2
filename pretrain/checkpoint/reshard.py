"""Resuming on another number of ranks: a checkpoint written by W ranks, read by W' != W.

A ZeRO-3 checkpoint holds each rank's partition of the fp32 master weights and Adam moments, so it loads only
at the world size that wrote it. DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`)
rewrites it as one file per parameter and state, which `load_checkpoint` then partitions for any world size.
This module makes that conversion safe to interrupt and cheap to repeat:

* the copy lives next to the original, in `runs/<name>/universal/<tag>/`, and never replaces it;
* it is built in a staging directory and renamed into place, then committed by a `COMMITTED` marker listing
  its files, so a kill at any moment leaves either a complete copy or one that the next start converts again;
* a restart at the same new world size reuses the committed copy.

Everything a resume restores besides the engine is independent of the world size (tokens, step, the loader's
global sample index, the batch schedule, the wandb run id), except each rank's RNG: rank r reads the RNG file
of rank r when the checkpoint has one, and a rank that did not exist when it was written starts from a state
derived from (train.seed, step, rank), the same on every restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from data.atomic_io import atomic_write_text
from data.log import get_logger

log = get_logger(__name__)

UNIVERSAL_DIR = "universal"
MARKER = "COMMITTED"


def universal_root(run_dir: Path) -> Path:
    return Path(run_dir) / UNIVERSAL_DIR


def committed_copy(run_dir: Path, name: str, source: Path) -> Path | None:
    """The committed universal copy `name` of checkpoint `source`, or None when there is none (or only a
    partial one, or one made from another checkpoint)."""
    path = universal_root(run_dir) / name
    try:
        listing = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if listing.get("source") != str(Path(source).resolve()):
        return None
    for file_name, size in listing.get("files", {}).items():
        file = path / file_name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return path


def convert(run_dir: Path, checkpoint: Path, name: str | None = None) -> tuple[Path, float, int]:
    """The committed universal copy of `checkpoint` in `run_dir` (converted now if needed), named `name`
    (default: the checkpoint's tag): (path, seconds spent converting, bytes).

    Call it on one rank only; the others wait at a barrier. An uncommitted copy (a conversion that was killed)
    and any staging directory are removed first.
    """
    name = name or checkpoint.name
    existing = committed_copy(run_dir, name, checkpoint)
    if existing is not None:
        return existing, 0.0, _size(existing)
    root = universal_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [root / name, *root.glob(".staging-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    started = time.perf_counter()
    # ds_to_universal writes `latest_universal` into its output's parent: keep that inside the staging dir.
    staging = root / f".staging-{os.getpid()}"
    output = staging / name
    _run_ds_to_universal(checkpoint, output)
    files = {str(p.relative_to(output)): p.stat().st_size for p in sorted(output.rglob("*")) if p.is_file()}
    final = root / name
    os.replace(output, final)
    shutil.rmtree(staging, ignore_errors=True)
    source = str(Path(checkpoint).resolve())
    atomic_write_text(final / MARKER, json.dumps({"source": source, "files": files}, indent=1))
    return final, time.perf_counter() - started, _size(final)


def _run_ds_to_universal(checkpoint: Path, output: Path) -> None:
    """DeepSpeed's converter in this process, one worker each (no process pool beside gloo's threads)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(output),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(sys.stderr):  # it prints its progress
        ds_to_universal.main(args)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def prune(run_dir: Path, keep: set[str]) -> None:
    """Drop universal copies of checkpoints that no longer exist (retention removed them)."""
    root = universal_root(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def derived_rng_state(seed: int, step: int, rank: int) -> None:
    """Seed this rank's RNGs from (seed, step, rank): for a rank the checkpoint has no RNG file for."""
    mixed = (seed * 1_000_003 + step) * 1_000_003 + rank
    torch.manual_seed(mixed % (2**63))
    random.seed(mixed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(mixed % (2**63))
