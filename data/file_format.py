"""What a local file's first bytes say it is, so that a file given to a reader of another kind fails at once.

A Parquet file read as JSON lines is thousands of "broken JSON" rejects and then "no valid text", which hides
the one mistake behind them: the source's `kind`. The readers in `data.sources` ask `check_file_format` first;
a whole file of another format is a config mistake, so it is a `ConfigError` that names the key to set, not a
per-record reject. Bad records inside a file of the right format stay rejects.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

from data.config import ConfigError, SourceConfig

PARQUET_MAGIC = b"PAR1"
# Compressions `data.sources` undoes, by the suffix it keys on, and the magic bytes that give each away.
COMPRESSION_MAGIC = {".gz": b"\x1f\x8b", ".bz2": b"BZh", ".xz": b"\xfd7zXZ\x00"}
# A decompressor per suffix: magic bytes alone could start a text line ("BZh"), a real stream also decodes.
_DECOMPRESSORS = {
    ".gz": lambda: zlib.decompressobj(wbits=31),
    ".bz2": bz2.BZ2Decompressor,
    ".xz": lzma.LZMADecompressor,
}
HEAD_BYTES = 4096
# What opening and reading a (compressed) file may raise; a file that does is left to the reader to report.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


def read_head(path: Path, opener: Callable[[Path], IO[bytes]] | None = None) -> bytes | None:
    """The first bytes of `path`, raw or through `opener` (a decompressing one for .gz and the like); None when
    they cannot be read, which the reader itself then reports as an unreadable file."""
    try:
        with opener(path) if opener is not None else path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except _READ_ERRORS:
        return None


def is_parquet(path: Path, head: bytes) -> bool:
    """PAR1 at both ends and a footer length that fits the file, as every Parquet file has; a text file that
    merely starts with the four letters does not pass."""
    if not head.startswith(PARQUET_MAGIC):
        return False
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            f.seek(max(0, size - 8))
            tail = f.read(8)
    except OSError:
        return False
    if size < 12 or len(tail) != 8 or tail[4:] != PARQUET_MAGIC:
        return False
    (footer,) = struct.unpack("<I", tail[:4])
    return footer <= size - 12


def text_format(head: bytes) -> str | None:
    """The kind that reads `head` as text: jsonl when its first character opens a JSON object, text for other
    UTF-8, None for binary."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a character cut at the end of the head
            return None
        text = head[: error.start].decode("utf-8")
    if "\x00" in text:
        return None
    return "jsonl" if text.lstrip("\ufeff \t\r\n").startswith("{") else "text"


def undeclared_compression(path: Path, head: bytes) -> str | None:
    """The suffix a compressed file should have when its name does not say so (then it would be read raw)."""
    if path.suffix.lower() in COMPRESSION_MAGIC:
        return None
    for suffix, magic in COMPRESSION_MAGIC.items():
        if not head.startswith(magic):
            continue
        try:
            output = _DECOMPRESSORS[suffix]().decompress(head)
        except _READ_ERRORS:
            continue
        # A stream decodes to text, or needs more than the head holds (a large bz2 block); a short file that is
        # nothing but the magic bytes does neither.
        if output or len(head) == HEAD_BYTES:
            return suffix
    return None


def check_file_format(
    source: SourceConfig, path: Path, decompressing: Callable[[Path], IO[bytes]], key: str = "data.sources"
) -> None:
    """Raise a ConfigError naming `<key>.<source>.kind` (or `.paths`) when `path` is plainly another format
    than the source's kind reads: Parquet (its "PAR1" magic) given to text or jsonl, JSON lines or text not named
    .parquet given to parquet, or compressed bytes whose name lacks the suffix that would decompress them.

    `decompressing` opens a file as the readers do (undoing .gz, .bz2 and .xz). An empty or unreadable file,
    or one that cannot be told apart, passes: the reader reports it as usual.
    """
    kind_key = f"{key}.{source.name}.kind"
    raw = read_head(path)
    if not raw:
        return
    suffix = undeclared_compression(path, raw)
    if suffix is not None:
        raise ConfigError(
            f"{key}.{source.name}.paths: {path} is compressed (its bytes start like a {suffix} file) but its "
            f"name does not end in {suffix}, so the {source.kind} reader would read compressed bytes; rename it "
            f"to {path.name}{suffix}"
        )
    if source.kind == "parquet":
        if is_parquet(path, raw) or path.suffix.lower() == ".parquet":
            return  # a .parquet file without the magic is a broken one, a reject of its own
        head = read_head(path, decompressing) if path.suffix.lower() in COMPRESSION_MAGIC else raw
        found = text_format(head) if head else None
        if found is not None:
            described = "JSON lines" if found == "jsonl" else "text"
            raise ConfigError(
                f"{kind_key}: {path} is {described}, not Parquet (no PAR1 magic bytes); "
                f"set {kind_key}={found}, or take the file out of the source's paths"
            )
        return
    if is_parquet(path, raw):
        raise ConfigError(
            f"{kind_key}: {path} is a Parquet file (PAR1 magic bytes at both ends), which a "
            f"{source.kind} source cannot read; set {kind_key}=parquet, or take the file out of the source's "
            "paths"
        )
