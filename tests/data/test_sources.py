"""Sources: every kind of bad record is rejected with its reason and exact location; valid ones come in order."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.config import ConfigError, SourceConfig
from data.rejects import REJECT_REASONS, RejectLog
from data.sources import (
    Document,
    expand_paths,
    iter_documents,
    source_files,
    stdlib_files,
)


def read(
    source: SourceConfig, max_doc_chars: int = 1000, **kw
) -> tuple[list[Document], list[dict], RejectLog]:
    """All documents of `source`, plus the rejects file's entries (in a hidden dir that globs and walks skip)."""
    path = None
    if source.paths:
        first = Path(source.paths[0])
        path = (first if first.is_dir() else first.parent) / ".out" / "rejects.jsonl"
    log = RejectLog(path)
    docs = list(iter_documents(source, max_doc_chars=max_doc_chars, rejects=log, **kw))
    log.close()
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path else []
    return docs, entries, log


def src(kind: str, *paths: Path | str, **kw) -> SourceConfig:
    return SourceConfig(kind=kind, paths=[str(p) for p in paths], name=kw.pop("name", "s"), **kw)


def where(entries: list[dict]) -> list[tuple[str, str]]:
    return [(e["location"].rsplit("/", 1)[-1], e["reason"]) for e in entries]


# ----------------------------------------------------------------------------------------------- JSONL

JSONL_LINES = [
    b'{"text": "first"}',  # 1 ok
    b"",  # 2 empty
    b"   \t",  # 3 whitespace-only line
    b'{"text": "  \\n "}',  # 4 whitespace-only text
    b'{"text": "bad \xff\xfe bytes"}',  # 5 invalid UTF-8
    b'{"text": "lone \\ud800 surrogate"}',  # 6 invalid UTF-8 (escaped lone surrogate)
    b'{"text": "nul \\u0000 inside"}',  # 7 NUL
    b'{"text": "broken"',  # 8 broken JSON
    b'{"body": "no text field"}',  # 9 missing
    b'{"text": null}',  # 10 missing (null)
    b'{"text": 42}',  # 11 non-string
    b'{"text": ["a"]}',  # 12 non-string
    b'{"text": "' + b"x" * 50 + b'"}',  # 13 too long (max 40)
    b"[1, 2]",  # 14 not an object
    b'{"text": "second", "extra": 1}\r',  # 15 ok (CRLF)
    b'{"text": "third with \\"quotes\\" and \\u00e9"}',  # 16 ok
    b'{"text": "cr \r inside is not a line break"}',  # 17 broken JSON: raw control character
]
JSONL_EXPECTED = [
    ("c.jsonl:2", "empty"),
    ("c.jsonl:3", "whitespace_only"),
    ("c.jsonl:4", "whitespace_only"),
    ("c.jsonl:5", "invalid_utf8"),
    ("c.jsonl:6", "invalid_utf8"),
    ("c.jsonl:7", "nul_byte"),
    ("c.jsonl:8", "broken_json"),
    ("c.jsonl:9", "missing_field"),
    ("c.jsonl:10", "missing_field"),
    ("c.jsonl:11", "non_string_field"),
    ("c.jsonl:12", "non_string_field"),
    ("c.jsonl:13", "too_long"),
    ("c.jsonl:14", "broken_json"),
    ("c.jsonl:17", "broken_json"),
]


def test_jsonl_rejects_each_bad_record_with_reason_and_exact_line(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(JSONL_LINES))  # no newline after the last line
    docs, entries, log = read(src("jsonl", tmp_path / "c.jsonl"), max_doc_chars=40)
    assert [d.text for d in docs] == ["first", "second", 'third with "quotes" and é']
    assert [d.location.rsplit("/", 1)[-1] for d in docs] == ["c.jsonl:1", "c.jsonl:15", "c.jsonl:16"]
    assert [d.ordinal for d in docs] == [0, 14, 15]
    assert where(entries) == JSONL_EXPECTED
    assert log.total == len(JSONL_EXPECTED) == sum(log.counts.values())
    assert {e["source"] for e in entries} == {"s"}
    assert set(log.counts) <= set(REJECT_REASONS)


def test_jsonl_text_field_is_configurable(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"content": "x", "text": 1}\n{"text": "y"}\n')
    docs, entries, _ = read(src("jsonl", tmp_path / "a.jsonl", text_field="content"))
    assert [d.text for d in docs] == ["x"]
    assert where(entries) == [("a.jsonl:2", "missing_field")]


def test_gzip_jsonl_and_a_truncated_gzip_do_not_crash(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines)[:-200])
    docs, entries, _ = read(src("jsonl", tmp_path / "*.jsonl.gz"), max_doc_chars=10_000)
    from_a = [d for d in docs if "a.jsonl.gz" in d.location]
    assert len(from_a) == 200
    assert len(docs) > 200  # b's readable lines still come through
    assert [e["reason"] for e in entries] == ["unreadable_file"]
    assert "b.jsonl.gz:" in entries[0]["location"]


def test_a_line_over_the_read_limit_is_skipped_without_losing_line_numbers(tmp_path: Path) -> None:
    huge = b'{"text": "' + b"y" * 200_000 + b'"}'
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "a"}\n' + huge + b'\n{"text": "b"}\n')
    docs, entries, _ = read(src("jsonl", tmp_path / "a.jsonl"), max_doc_chars=10)
    assert [(d.text, d.location.rsplit(":", 1)[-1]) for d in docs] == [("a", "1"), ("b", "3")]
    assert where(entries) == [("a.jsonl:2", "too_long")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
            st.text(max_size=20).map(lambda t: json.dumps({"text": t}).encode()),
        ),
        max_size=30,
    )
)
def test_every_jsonl_line_is_either_a_document_or_a_reject(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    log = RejectLog(None)
    docs = list(iter_documents(src("jsonl", path), max_doc_chars=15, rejects=log))
    assert len(docs) + log.total == len(lines)
    assert all(d.text and not d.text.isspace() and "\x00" not in d.text for d in docs)
    assert [int(d.location.rsplit(":", 1)[1]) for d in docs] == [d.ordinal + 1 for d in docs]
    for doc in docs:
        assert json.loads(lines[doc.ordinal])["text"] == doc.text


# ----------------------------------------------------------------------------------------------- text


TEXT = b"alpha one\nalpha two\n\nbeta \xff\n   \n\n\ngamma\r\nwith \x00 nul\n \t \nlast\rline"


def test_text_per_line(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(TEXT)
    docs, entries, _ = read(src("text", tmp_path / "t.txt", text_unit="line"))
    assert [(d.text, d.location.rsplit(":", 1)[-1]) for d in docs] == [
        ("alpha one", "1"),
        ("alpha two", "2"),
        ("gamma", "8"),
        ("last\rline", "11"),  # a lone CR is not a line break
    ]
    assert where(entries) == [
        ("t.txt:3", "empty"),
        ("t.txt:4", "invalid_utf8"),
        ("t.txt:5", "whitespace_only"),
        ("t.txt:6", "empty"),
        ("t.txt:7", "empty"),
        ("t.txt:9", "nul_byte"),
        ("t.txt:10", "whitespace_only"),
    ]


def test_text_per_paragraph(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(TEXT)
    docs, entries, _ = read(src("text", tmp_path / "t.txt", text_unit="paragraph"))
    assert [(d.text, d.location.rsplit(":", 1)[-1]) for d in docs] == [
        ("alpha one\nalpha two", "1"),
        ("last\rline", "11"),
    ]
    assert [d.ordinal for d in docs] == [0, 3]
    assert where(entries) == [
        ("t.txt:4", "invalid_utf8"),
        ("t.txt:8", "nul_byte"),  # "gamma" + "with \x00 nul" is one paragraph starting at line 8
    ]


def test_text_per_paragraph_keeps_a_valid_last_paragraph(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_bytes(b"\n\none\r\ntwo\n\n\nthree\n")
    docs, entries, _ = read(src("text", tmp_path / "p.txt", text_unit="paragraph"))
    assert [(d.text, d.location.rsplit(":", 1)[-1]) for d in docs] == [("one\ntwo", "3"), ("three", "7")]
    assert entries == []


def test_text_per_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    (tmp_path / "b.txt").write_bytes(b"ok\nbad \xc3\x28 here\n")
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "d.txt").write_bytes(b" \n\t\n")
    (tmp_path / "e.txt").write_bytes(b"z" * 5000)  # over 4 * max_doc_chars bytes: rejected unread
    (tmp_path / "f.txt").write_bytes(b"z" * 150)
    docs, entries, _ = read(src("text", tmp_path), max_doc_chars=100)
    assert [(d.text, d.location.rsplit("/", 1)[-1]) for d in docs] == [("hello\nworld\n", "a.txt")]
    assert where(entries) == [
        ("b.txt", "invalid_utf8"),
        ("c.txt", "empty"),
        ("d.txt", "whitespace_only"),
        ("e.txt", "too_long"),
        ("f.txt", "too_long"),
    ]
    assert "line 2" in entries[0]["detail"]


# ----------------------------------------------------------------------------------------------- parquet


def test_parquet_rows_fields_and_broken_files(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        pa.table({"text": ["one", None, "", "two", "x" * 99], "n": [1, 2, 3, 4, 5]}), tmp_path / "a.parquet"
    )
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "c.parquet")
    (tmp_path / "d.parquet").write_bytes(b"not a parquet file")
    pq.write_table(pa.table({"text": ["three"]}), tmp_path / "e.parquet")
    docs, entries, _ = read(src("parquet", tmp_path / "*.parquet"), max_doc_chars=50)
    assert [(d.text, d.location.rsplit("/", 1)[-1], d.ordinal) for d in docs] == [
        ("one", "a.parquet#row=0", 0),
        ("two", "a.parquet#row=3", 3),
        ("three", "e.parquet#row=0", 7),
    ]
    assert where(entries) == [
        ("a.parquet#row=1", "missing_field"),
        ("a.parquet#row=2", "empty"),
        ("a.parquet#row=4", "too_long"),
        ("b.parquet#row=0", "non_string_field"),
        ("b.parquet#row=1", "non_string_field"),
        ("c.parquet", "missing_field"),
        ("d.parquet", "unreadable_file"),
    ]


def write_parquet(path: Path, texts: list[str]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": texts}), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "text"])
@pytest.mark.parametrize("name", ["web.parquet", "web.jsonl", "web.bin"])
def test_a_parquet_file_in_a_jsonl_or_text_source_is_a_config_error_naming_the_kind(tmp_path, kind, name):
    """Found by its PAR1 magic whatever its name, before any line is read as JSON or text."""
    path = write_parquet(tmp_path / name, [f"document {i}" for i in range(2000)])
    log = RejectLog(tmp_path / ".out" / "rejects.jsonl")
    with pytest.raises(ConfigError, match=r"^data\.sources\.web\.kind: .* is a Parquet file") as raised:
        list(iter_documents(src(kind, path, name="web"), max_doc_chars=1000, rejects=log))
    assert "set data.sources.web.kind=parquet" in str(raised.value) and str(path) in str(raised.value)
    assert log.total == 0


def test_a_parquet_file_among_jsonl_files_fails_only_when_reached_and_names_that_file(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "kept"}\n')
    bad = write_parquet(tmp_path / "b.parquet", ["x"])
    source = src("jsonl", tmp_path / "a.jsonl", bad)
    documents = iter_documents(source, max_doc_chars=100)
    assert next(documents).text == "kept"
    with pytest.raises(ConfigError, match=re.escape(f"data.sources.s.kind: {bad} is a Parquet file")):
        next(documents)


@pytest.mark.parametrize(
    ("name", "content", "found"),
    [
        ("web.jsonl", b'{"text": "json lines"}\n', "jsonl"),
        # mtime=0: the bytes are in the test's id, which every xdist worker must collect alike
        (
            "web.jsonl.gz",
            gzip.compress(b'\xef\xbb\xbf {"text": "compressed json lines"}\n', mtime=0),
            "jsonl",
        ),
        ("notes.txt", "plain text, caf\u00e9\n".encode(), "text"),
    ],
)
def test_json_lines_or_text_in_a_parquet_source_names_the_kind_to_set(tmp_path, name, content, found):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(f"set data.sources.s.kind={found},")):
        read(src("parquet", tmp_path / name))


def test_compressed_bytes_without_their_suffix_name_the_suffix(tmp_path):
    (tmp_path / "web.jsonl").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(ConfigError, match=r"^data\.sources\.s\.paths: .* rename it to web\.jsonl\.gz$"):
        read(src("jsonl", tmp_path / "web.jsonl"))


def test_a_broken_parquet_file_and_binary_text_stay_rejects(tmp_path):
    """Not another format, only bad content: a file named .parquet without the magic, undecodable bytes."""
    (tmp_path / "d.parquet").write_bytes(b"\x00\x01 not parquet")
    _, entries, _ = read(src("parquet", tmp_path / "d.parquet"))
    assert where(entries) == [("d.parquet", "unreadable_file")]
    (tmp_path / "e.bin").write_bytes(b"\xff\xfe\x00\x01 binary")
    _, entries, _ = read(src("parquet", tmp_path / "e.bin"))
    assert where(entries) == [("e.bin", "unreadable_file")]


@pytest.mark.parametrize(
    "first_line",
    [b"PAR1 starts and ends this line PAR1", b"BZh", b"BZh91AY&SY", b"\xfd7zXZ\x00", b"\x1f\x8b\x08"],
)
def test_a_line_that_merely_starts_like_another_format_stays_a_reject(tmp_path, first_line):
    """Magic bytes alone decide nothing: Parquet also needs its footer, a compressed stream must decode."""
    kept = b'{"text": "kept"}\n'
    files = {
        "p.jsonl": kept + first_line,
        "q.jsonl": first_line + b"\n" + kept,
        "r.jsonl": first_line + b"\n" + kept,
    }
    files["r.jsonl"] += first_line  # the same bytes at both ends, as Parquet's magic is
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        docs, entries, _ = read(src("jsonl", tmp_path / name))
        assert [d.text for d in docs] == ["kept"] and len(entries) == content.count(first_line)


# ----------------------------------------------------------------------------------------------- paths


def test_expand_paths_files_dirs_globs(tmp_path: Path) -> None:
    for name in [
        "d/b.jsonl",
        "d/sub/a.jsonl",
        "d/.hidden.jsonl",
        "d/_SUCCESS",
        "d/_tmp/x.jsonl",
        "top.jsonl",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    got = expand_paths([str(tmp_path / "d"), str(tmp_path / "*.jsonl"), str(tmp_path / "d/b.jsonl")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["d/b.jsonl", "d/sub/a.jsonl", "top.jsonl"]
    deep = expand_paths([str(tmp_path / "**/*.jsonl")])
    assert "d/sub/a.jsonl" in [p.relative_to(tmp_path).as_posix() for p in deep]


def test_expand_paths_names_the_pattern_that_matches_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"nope/\*\.jsonl"):
        expand_paths([str(tmp_path / "a.jsonl"), str(tmp_path / "nope/*.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        list(iter_documents(src("text", tmp_path / "missing.txt"), max_doc_chars=10))


def test_files_restricts_a_source_to_a_subset(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"text": f"doc{i}"}) + "\n")
    source = src("jsonl", tmp_path / "*.jsonl")
    files = source_files(source)
    assert [p.name for p in files] == ["0.jsonl", "1.jsonl", "2.jsonl"]
    docs = list(iter_documents(source, max_doc_chars=10, files=files[1:]))
    assert [d.text for d in docs] == ["doc1", "doc2"]
    with pytest.raises(ValueError, match="files="):
        list(iter_documents(SourceConfig(kind="python_docs", name="p"), max_doc_chars=10, files=files))


# ----------------------------------------------------------------------------------------------- embedded


def test_python_stdlib_is_deterministic_and_one_document_per_file() -> None:
    source = SourceConfig(kind="python_stdlib", name="code")
    first = list(iter_documents(source, max_doc_chars=10_000_000))
    second = list(iter_documents(source, max_doc_chars=10_000_000))
    assert first == second
    names = [p.name for p in stdlib_files()]
    assert names == sorted(names) and "os.py" in names
    assert not any(n.startswith("_sysconfigdata") for n in names)
    assert [d.location for d in first] == [f"stdlib:{n}" for n in names]
    os_doc = next(d for d in first if d.location == "stdlib:os.py")
    assert "def makedirs" in os_doc.text


def test_python_docs_is_sorted_by_topic() -> None:
    from pydoc_data.topics import topics

    docs = list(iter_documents(SourceConfig(kind="python_docs", name="docs"), max_doc_chars=10_000_000))
    assert [d.location for d in docs] == [f"pydoc:{k}" for k in sorted(topics)]
    assert [d.ordinal for d in docs] == list(range(len(topics)))
    assert all(d.source == "docs" for d in docs)


def test_embedded_documents_over_the_limit_are_rejected() -> None:
    log = RejectLog(None)
    docs = list(iter_documents(SourceConfig(kind="python_docs", name="d"), max_doc_chars=2000, rejects=log))
    assert docs and log.counts.get("too_long", 0) > 0
    assert all(len(d.text) <= 2000 for d in docs)


# ----------------------------------------------------------------------------------------------- reject log


def test_reject_log_is_written_atomically_on_close(tmp_path: Path) -> None:
    path = tmp_path / "out" / "rejects.jsonl"
    log = RejectLog(path)
    log.add("web", "a.jsonl:3", "broken_json", "Expecting value")
    log.add("web", "a.jsonl:9", "empty")
    assert not path.exists()  # only a temporary file until close()
    log.close()
    log.close()  # safe twice
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"source": "web", "location": "a.jsonl:3", "reason": "broken_json", "detail": "Expecting value"},
        {"source": "web", "location": "a.jsonl:9", "reason": "empty"},
    ]
    assert log.summary() == {"total": 2, "by_reason": {"broken_json": 1, "empty": 1}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["rejects.jsonl"]
    with pytest.raises(RuntimeError, match="closed"):
        log.add("web", "x", "empty")


def test_reject_log_without_a_path_only_counts(tmp_path: Path) -> None:
    with RejectLog(None) as log:
        log.add("s", "l", "too_long")
    assert log.total == 1 and log.counts == {"too_long": 1}
    assert list(tmp_path.iterdir()) == []


def test_hub_kind_reads_a_dataset_by_name(tmp_path: Path) -> None:
    """`load_dataset(name, ...)` also accepts a local dataset directory, which exercises the hub path offline."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"content": ["one", None, "two", " "]}), repo / "data" / "train-00000.parquet")
    source = SourceConfig(kind="hub", hub_name=str(repo), split="train", text_field="content", name="h")
    log = RejectLog(None)
    docs = list(iter_documents(source, max_doc_chars=100, rejects=log))
    assert [(d.text, d.location) for d in docs] == [
        ("one", f"hub:{repo}#row=0"),
        ("two", f"hub:{repo}#row=2"),
    ]
    assert log.counts == {"missing_field": 1, "whitespace_only": 1}
