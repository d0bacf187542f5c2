"""Documents from local files, Hugging Face datasets and the embedded Python corpus, with bad records rejected.

Every reader yields only valid documents, in a deterministic order, and reports every bad record to a
`RejectLog` with its source, location and a short stable reason, so bad input never crashes a stage and never
vanishes silently. Reading is streamed record by record, so a corpus larger than memory works.

Local text and JSONL files are read here in binary, line by line, rather than through the `datasets` text
builder. In datasets 5.2 that builder cannot be robust and exact at once: with
`encoding_errors="surrogateescape"` the lone surrogates it produces make Arrow raise for the whole file,
"replace"/"backslashreplace" make an invalid byte indistinguishable from valid text, and its universal-newline
mode counts a lone "\\r" as a line break, so its line numbers differ from the file's. It also drops empty
paragraphs, so paragraph numbers would not be exact. Parquet files and hub datasets go through `datasets`.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from data.config import SourceConfig
from data.file_format import check_file_format
from data.log import get_logger
from data.rejects import RejectLog

log = get_logger(__name__)

FILE_KINDS = ("text", "jsonl", "parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What a truncated or corrupt (compressed) file raises while it is read.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
# Bytes a JSONL line may take per character of text (escapes such as "\\ud83d\\ude00"), plus other fields.
_JSON_BYTES_PER_CHAR = 12
_JSON_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    """One valid document; `location` says where it came from, `ordinal` counts raw records (valid or not)."""

    text: str
    source: str
    location: str
    ordinal: int


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Files, directories (recursive) and globs (`**` allowed) as one sorted list without duplicates.

    Inside directories, names starting with "." or "_" are skipped (hidden files, Spark's `_SUCCESS`).
    A pattern that matches nothing is an error naming it, so a typo never silently drops a source.
    """
    found: dict[Path, Path] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        files: list[Path] = []
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files.extend(_walk_dir(path))
            elif path.is_file():
                files.append(path)
        if not files:
            raise FileNotFoundError(
                f"no files match {pattern!r} (cwd {os.getcwd()}); check the source's `paths` in the data config"
            )
        for path in files:
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=str)


def _walk_dir(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith((".", "_")))
    return files


def source_files(source: SourceConfig) -> list[Path]:
    """The files of a text/jsonl/parquet source, in reading order (to split work across jobs)."""
    if source.kind not in FILE_KINDS:
        raise ValueError(f"source {source.name!r} of kind {source.kind!r} has no files; only {FILE_KINDS} do")
    return expand_paths(source.paths)


def iter_documents(
    source: SourceConfig,
    *,
    max_doc_chars: int,
    streaming: bool = True,
    rejects: RejectLog | None = None,
    files: list[Path] | None = None,
) -> Iterator[Document]:
    """Valid documents of one source in a deterministic order; every bad record goes to `rejects`.

    `files` restricts a file-based source to a subset of its files; ordinals then count records of that subset.
    """
    if files is not None and source.kind not in FILE_KINDS:
        raise ValueError(f"files= only applies to {FILE_KINDS} sources, not {source.name!r} ({source.kind})")
    checker = _Checker(source.name, max_doc_chars, rejects if rejects is not None else RejectLog(None))
    if source.kind in FILE_KINDS:
        paths = list(files) if files is not None else source_files(source)
        records = _file_records(source, paths, max_doc_chars, streaming, checker)
    elif source.kind == "hub":
        records = _hub_records(source, streaming)
    elif source.kind == "python_stdlib":
        records = _stdlib_records()
    elif source.kind == "python_docs":
        records = _pydoc_records()
    else:
        raise ValueError(f"unknown source kind {source.kind!r} for source {source.name!r}")
    for ordinal, (location, text) in enumerate(records):
        if checker.accept(location, text):
            assert isinstance(text, str)
            yield Document(text=text, source=source.name, location=location, ordinal=ordinal)
    if rejects is None and checker.rejects.total:
        log.warning(
            "source %s: rejected %d records %s (pass a RejectLog to list them)",
            source.name,
            checker.rejects.total,
            checker.rejects.summary()["by_reason"],
        )


class _Checker:
    """Validates raw records: `text` is a str, or a reject reason already decided by the reader."""

    def __init__(self, source: str, max_doc_chars: int, rejects: RejectLog) -> None:
        self.source = source
        self.max_doc_chars = max_doc_chars
        self.rejects = rejects

    def reject(self, location: str, reason: str, detail: str = "") -> None:
        self.rejects.add(self.source, location, reason, detail)

    def accept(self, location: str, text: str | _Reject) -> bool:
        if isinstance(text, _Reject):
            self.reject(location, text.reason, text.detail)
            return False
        reason, detail = _text_problem(text, self.max_doc_chars)
        if reason:
            self.reject(location, reason, detail)
            return False
        return True


@dataclass(frozen=True)
class _Reject:
    reason: str
    detail: str = ""


def _text_problem(text: str, max_doc_chars: int) -> tuple[str, str]:
    if not text:
        return "empty", ""
    if len(text) > max_doc_chars:
        return "too_long", f"{len(text)} characters > data.max_doc_chars={max_doc_chars}"
    if "\x00" in text:
        return "nul_byte", f"first NUL at character {text.index(chr(0))}"
    match = _SURROGATE.search(text)
    if match:
        return "invalid_utf8", f"lone surrogate U+{ord(match.group()):04X} at character {match.start()}"
    if text.isspace():
        return "whitespace_only", ""
    return "", ""


Record = tuple[str, str | _Reject]


# ----------------------------------------------------------------------------------------------- local files


def _file_records(
    source: SourceConfig, paths: list[Path], max_doc_chars: int, streaming: bool, checker: _Checker
) -> Iterator[Record]:
    for path in paths:
        check_file_format(source, path, _open_binary)  # a whole file of another format is a config mistake
        try:
            if source.kind == "jsonl":
                yield from _jsonl_records(path, source.text_field, max_doc_chars)
            elif source.kind == "parquet":
                yield from _parquet_records(path, source.text_field, streaming, checker)
            elif source.text_unit == "document":
                yield from _text_document_records(path, max_doc_chars)
            elif source.text_unit == "line":
                yield from _text_line_records(path, max_doc_chars)
            else:
                yield from _text_paragraph_records(path, max_doc_chars)
        except _UnreadableFile as error:
            checker.reject(error.location, "unreadable_file", error.detail)


class _UnreadableFile(Exception):
    def __init__(self, location: str, detail: str) -> None:
        super().__init__(f"{location}: {detail}")
        self.location = location
        self.detail = detail


def _open_binary(path: Path) -> IO[bytes]:
    opener = _COMPRESSED.get(path.suffix.lower())
    try:
        return opener(path, "rb") if opener else open(path, "rb")  # type: ignore[return-value]
    except OSError as error:
        raise _UnreadableFile(str(path), f"cannot open: {error}") from error


def _iter_lines(path: Path, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the newline), or None for a line over `limit` bytes.

    Only b"\\n" ends a line, so numbers match `sed -n Np`; a line too long is skipped in chunks, never held.
    """
    with _open_binary(path) as f:
        number = 0
        try:
            while True:
                line = f.readline(limit + 1)
                if not line:
                    return
                number += 1
                if len(line) > limit and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):
                        line = f.readline(1 << 20)
                    yield number, None
                    continue
                if line.endswith(b"\n"):
                    line = line[:-1]
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                yield number, line
        except _READ_ERRORS as error:
            raise _UnreadableFile(f"{path}:{number + 1}", f"read failed: {error}") from error


def _decode(data: bytes) -> str | _Reject:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        return _Reject("invalid_utf8", f"{error.reason} at byte {error.start}")


def _jsonl_records(path: Path, field: str, max_doc_chars: int) -> Iterator[Record]:
    limit = _JSON_BYTES_PER_CHAR * max_doc_chars + _JSON_SLACK_BYTES
    for number, raw in _iter_lines(path, limit):
        location = f"{path}:{number}"
        if raw is None:
            yield location, _Reject("too_long", f"line longer than {limit} bytes")
            continue
        yield location, _parse_json_line(raw, field)


def _parse_json_line(raw: bytes, field: str) -> str | _Reject:
    line = _decode(raw.rstrip(b"\r"))
    if isinstance(line, _Reject):
        return line
    if not line:
        return _Reject("empty", "empty line")
    if line.isspace():
        return _Reject("whitespace_only", "blank line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return _Reject("broken_json", f"{error.msg} at column {error.colno}")
    if not isinstance(record, dict):
        return _Reject("broken_json", f"a JSON {type(record).__name__}, not an object")
    value = record.get(field)
    if value is None:
        return _Reject(
            "missing_field", f"no {field!r} field" if field not in record else f"{field!r} is null"
        )
    if not isinstance(value, str):
        return _Reject("non_string_field", f"{field!r} is a JSON {type(value).__name__}")
    return value


def _text_document_records(path: Path, max_doc_chars: int) -> Iterator[Record]:
    location = str(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _UnreadableFile(location, f"cannot stat: {error}") from error
    # A UTF-8 character takes at most 4 bytes, so a larger file is too long without reading it into memory.
    if path.suffix.lower() not in _COMPRESSED and size > 4 * max_doc_chars:
        yield location, _Reject("too_long", f"{size} bytes > 4 * data.max_doc_chars={max_doc_chars}")
        return
    with _open_binary(path) as f:
        try:
            data = f.read(4 * max_doc_chars + 1)
            oversized = len(data) > 4 * max_doc_chars
        except _READ_ERRORS as error:
            raise _UnreadableFile(location, f"read failed: {error}") from error
    if oversized:
        yield location, _Reject("too_long", f"more than {4 * max_doc_chars} bytes")
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        yield location, data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        yield location, _Reject("invalid_utf8", f"{error.reason} at byte {error.start} (line {line})")


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _text_line_records(path: Path, max_doc_chars: int) -> Iterator[Record]:
    limit = 4 * max_doc_chars + 1
    for number, raw in _iter_lines(path, limit):
        location = f"{path}:{number}"
        if raw is None:
            yield location, _Reject("too_long", f"line longer than {limit} bytes")
        else:
            yield location, _decode(_strip_cr(raw))


def _text_paragraph_records(path: Path, max_doc_chars: int) -> Iterator[Record]:
    """Paragraphs are runs of lines that are not blank (ASCII whitespace only); located by their first line."""
    limit = 4 * max_doc_chars + 1
    start = 0
    lines: list[bytes] = []
    size = 0
    oversized = False

    def finish() -> Record:
        location = f"{path}:{start}"
        if oversized:
            return location, _Reject("too_long", f"paragraph longer than {limit} bytes")
        return location, _decode(b"\n".join(lines))

    for number, raw in _iter_lines(path, limit):
        if raw is not None and not raw.strip():
            if start:
                yield finish()
            start, lines, size, oversized = 0, [], 0, False
            continue
        if not start:
            start = number
        if raw is None or oversized or size + len(raw) > limit:
            oversized, lines = True, []
            continue
        lines.append(_strip_cr(raw))
        size += len(raw) + 1
    if start:
        yield finish()


def _parquet_records(path: Path, field: str, streaming: bool, checker: _Checker) -> Iterator[Record]:
    import datasets
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a corrupt or unreadable file
        raise _UnreadableFile(str(path), f"not a readable parquet file: {error}") from error
    if field not in schema.names:
        checker.reject(str(path), "missing_field", f"no column {field!r}; columns are {schema.names}")
        return
    rows = datasets.load_dataset(
        "parquet", data_files=[str(path)], split="train", streaming=streaming, columns=[field]
    )
    row = 0
    try:
        for row, record in enumerate(rows):
            yield f"{path}#row={row}", _field_value(record, field)
    except Exception as error:  # a file truncated or corrupt after its footer fails mid-stream
        raise _UnreadableFile(f"{path}#row={row}", f"read failed: {error}") from error


def _field_value(record: dict[str, Any], field: str) -> str | _Reject:
    value = record.get(field)
    if value is None:
        return _Reject(
            "missing_field", f"no {field!r} field" if field not in record else f"{field!r} is null"
        )
    if isinstance(value, bytes):
        return _decode(value)
    if not isinstance(value, str):
        return _Reject("non_string_field", f"{field!r} is {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------- hub and embedded


def _hub_records(source: SourceConfig, streaming: bool) -> Iterator[Record]:
    """Rows of a hub dataset; needs network access (or a local HF cache). Network errors are real errors."""
    import datasets

    rows = datasets.load_dataset(source.hub_name, source.hub_config, split=source.split, streaming=streaming)
    for row, record in enumerate(rows):
        yield f"hub:{source.hub_name}#row={row}", _field_value(record, source.text_field)


def stdlib_files() -> list[Path]:
    """Top-level `.py` files of the running Python's standard library, sorted by name.

    `_sysconfigdata*` is left out: it is generated at build time and holds build paths, so it differs between
    installs of the same Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        (p for p in stdlib.glob("*.py") if p.is_file() and not p.name.startswith("_sysconfigdata")),
        key=lambda p: p.name,
    )


def _stdlib_records() -> Iterator[Record]:
    for path in stdlib_files():
        yield f"stdlib:{path.name}", _decode(path.read_bytes())


def _pydoc_records() -> Iterator[Record]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key]
