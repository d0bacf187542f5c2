"""The rejects list: every bad record is skipped, counted by reason and listed, never silently dropped.

Dirty input must neither crash a long run nor vanish unnoticed: a record that cannot be used is skipped, and
the count per reason goes into the manifest or meta file so a person can see how much was lost and why. Each
line of a rejects file is {"source", "location", "reason"[, "detail"]}, where the location is a file and line,
a file and row, or a hub row, so the record can be found and fixed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from data.atomic_io import FILE_MODE
from data.log import get_logger

log = get_logger(__name__)

REJECT_REASONS = (
    "empty",
    "whitespace_only",
    "invalid_utf8",
    "nul_byte",
    "broken_json",
    "missing_field",
    "non_string_field",
    "too_long",
    "unreadable_file",
)


class RejectLog:
    """Counts rejected records by reason and lists each one in a JSONL file, committed atomically on close().

    Entries are streamed to a temporary file next to `path`, so memory stays bounded however many records are
    rejected; `close()` flushes, fsyncs and renames it into place. With `path=None` it only counts.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: dict[str, int] = {}
        self.total = 0
        self._closed = False
        self._tmp_path: Path | None = None
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
            os.fchmod(fd, FILE_MODE)  # mkstemp makes it private; the list is for people to read
            self._tmp_path = Path(tmp_name)
            # backslashreplace: a file name that is not UTF-8 (surrogate-escaped) must not fail the write
            self._file = os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace")

    def add(self, source: str, location: str, reason: str, detail: str = "") -> None:
        """Count one rejected record; `reason` is a stable slug from REJECT_REASONS, `detail` free text."""
        if self._closed:
            raise RuntimeError(f"RejectLog for {self.path} is closed; cannot add a reject from {location}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.total += 1
        if self._file is not None:
            entry = {"source": source, "location": location, "reason": reason}
            if detail:
                entry["detail"] = detail
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def summary(self) -> dict[str, Any]:
        """{"total": n, "by_reason": {reason: n}} for manifests and meta files."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items()))}

    def close(self) -> None:
        """Write the file into place (tmp + fsync + os.replace); calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None and self._tmp_path is not None and self.path is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path, self.path)
        if self.total:
            log.warning(
                "rejected %d records %s; listed in %s", self.total, self.summary()["by_reason"], self.path
            )

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
