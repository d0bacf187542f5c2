"""Writing token shards (the format is `data.shards`): streamed to a temporary file, committed by a rename.

A reader must never see a half-written shard under its real name, even after a crash or a SIGKILL: the tokens
go to a temporary file in the same directory, the header is written last, and only a complete, fsync'd file is
renamed into place. `close()` returns `ShardStats`, what a manifest needs to list the shard.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.atomic_io import FILE_MODE, fsync_dir
from data.shards import (
    HEADER_SIZE,
    check_offsets,
    documents_digest,
    format_checksum,
    pack_header,
    padded,
    token_dtype,
)


@dataclass(frozen=True)
class ShardStats:
    """What `ShardWriter.close` / `write_shard` wrote: enough for the manifest."""

    path: Path
    n_docs: int
    n_tokens: int
    dtype: str
    checksum: str
    source_digest: str


def _check_fingerprint_format(path: Path, fingerprint: str) -> None:
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        raise ValueError(
            f"{path}: tokenizer fingerprint must be 64 lowercase hex characters, got {fingerprint!r}"
        )


class ShardWriter:
    """Streams the documents of one shard to a temporary file; `close()` commits it under its real name.

    Tokens go to disk as they arrive, so memory does not grow with the shard; only the document lengths are
    kept. The header is written last (over a zeroed placeholder), then the file is fsync'd and renamed.
    """

    def __init__(self, path: str | Path, *, vocab_size: int, fingerprint: str) -> None:
        self.path = Path(path)
        _check_fingerprint_format(self.path, fingerprint)
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.dtype = token_dtype(vocab_size)
        self.n_tokens = 0
        self._lengths: list[np.ndarray] = []
        self._digests: list[np.ndarray] = []
        self._crc = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\x00" * HEADER_SIZE)

    @property
    def n_docs(self) -> int:
        return sum(len(lengths) for lengths in self._lengths)

    def add(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray | Sequence[int] | None = None,
        digests: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Append documents: `tokens` holds them back to back, `lengths` their sizes (default: one document),
        `digests` a uint64 digest of each one's text (default 0, unknown)."""
        tokens = np.asarray(tokens)
        lengths = np.array([len(tokens)] if lengths is None else lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens) or (len(lengths) and int(lengths.min()) < 0):
            raise ValueError(f"{self.path}: document lengths must be >= 0 and sum to {len(tokens)} tokens")
        digests = np.zeros(len(lengths), "<u8") if digests is None else np.asarray(digests, dtype="<u8")
        if digests.shape != lengths.shape:
            raise ValueError(f"{self.path}: {len(digests)} digests for {len(lengths)} documents")
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"{self.path}: token ids must lie in [0, {self.vocab_size}) for vocab size {self.vocab_size}, "
                f"got min {int(tokens.min())} max {int(tokens.max())}"
            )
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._file.write(memoryview(data).cast("B"))
        self._crc = zlib.crc32(data, self._crc)
        self.n_tokens += len(data)
        self._lengths.append(lengths)
        self._digests.append(digests)

    def close(self) -> ShardStats:
        """Write offsets, digests and header, fsync, and rename into place."""
        try:
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
            digests = np.concatenate(self._digests) if self._digests else np.zeros(0, dtype="<u8")
            source_digest = documents_digest(digests)
            offsets = np.zeros(len(lengths) + 1, dtype="<i8")
            np.cumsum(lengths, out=offsets[1:])
            token_bytes = self.n_tokens * self.dtype.itemsize
            padding = b"\x00" * (padded(token_bytes) - token_bytes)
            self._file.write(padding)
            self._file.write(offsets.tobytes())
            self._file.write(digests.tobytes())
            crc = zlib.crc32(digests, zlib.crc32(offsets, zlib.crc32(padding, self._crc)))
            n_docs = len(lengths)
            self._file.seek(0)
            self._file.write(
                pack_header(
                    self.dtype,
                    self.vocab_size,
                    self.fingerprint,
                    bytes.fromhex(source_digest),
                    n_docs,
                    self.n_tokens,
                    crc,
                )
            )
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return ShardStats(
            self.path, n_docs, self.n_tokens, self.dtype.name, format_checksum(crc), source_digest
        )

    def abort(self) -> None:
        """Drop the temporary file (the real name is never touched)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(
    path: str | Path,
    docs: Sequence[np.ndarray] | None = None,
    *,
    tokens: np.ndarray | None = None,
    doc_offsets: np.ndarray | None = None,
    vocab_size: int,
    fingerprint: str,
    doc_digests: np.ndarray | Sequence[int] | None = None,
) -> ShardStats:
    """Write one shard atomically from a list of per-document id arrays, or from `tokens` + `doc_offsets`.

    Ids must lie in [0, vocab_size); uint16 is used iff vocab_size <= 65536 (so every id < 65536), else uint32.
    `doc_digests` (uint64 per document) identify the texts the documents were made from.
    """
    path = Path(path)
    if (docs is None) == (tokens is None):
        raise ValueError("write_shard takes either `docs` or `tokens` + `doc_offsets`")
    if docs is not None:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        tokens = np.concatenate(docs) if len(docs) else np.zeros(0, dtype=np.int64)
    else:
        if doc_offsets is None:
            raise ValueError(f"{path}: write_shard with `tokens` needs `doc_offsets`")
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        check_offsets(path, offsets, len(tokens))
        lengths = np.diff(offsets)
    with ShardWriter(path, vocab_size=vocab_size, fingerprint=fingerprint) as writer:
        writer.add(tokens, lengths, doc_digests)
        return writer.close()
