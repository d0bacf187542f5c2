"""Atomic commits: write to a temporary name in the same directory, fsync, rename, fsync the directory.

Shards, manifests, tokenizers and checkpoints must never be seen half-written: a reader that finds a file (or
directory) under its real name must be able to trust it, even after a crash or a SIGKILL mid-write, because
whether work is redone is decided by what exists. So a reader sees either the old version or the whole new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # mkstemp makes files private; artifacts are meant to be shared


def atomic_write_bytes(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write `chunks` to a temporary file next to `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Commit `obj` as indented JSON with sorted keys, so equal objects give byte-identical files."""
    atomic_write_bytes(path, [json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"])


def atomic_write_text(path: Path, text: str) -> None:
    """Commit `text` (UTF-8) under `path`."""
    atomic_write_bytes(path, [text.encode()])


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target`, replacing any old `target`.

    A directory cannot be renamed over a non-empty one, so the old one is moved aside first; if moving `tmp` in
    then fails, the old one is moved back, so `target` is never left missing. The old one is deleted only once
    the new one is in place. The caller still owns `tmp` if this raises.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by an earlier crash of this same process id
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
