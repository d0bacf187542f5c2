"""Atomic file commits: write to a temporary name in the same directory, fsync, rename, fsync the directory.

A reader therefore sees either the old file or the whole new one, never a torn write, even after a crash or a
SIGKILL (DESIGN contracts 4 and 5). Shards, manifests, tokenizer files and checkpoint markers all go through it.
"""

from __future__ import annotations

import json
import os
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
    atomic_write_bytes(path, [json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, [text.encode()])
