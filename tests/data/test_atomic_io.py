"""Atomic commits: a failed write leaves nothing, and a failed directory swap leaves the old directory."""

from __future__ import annotations

import os

import pytest

from data.atomic_io import atomic_write_bytes, replace_dir


def test_failed_write_leaves_nothing(tmp_path):
    def chunks():
        yield b"partial"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(tmp_path / "x.bin", chunks())
    assert list(tmp_path.iterdir()) == []


def _tree(directory):
    return {p.name: p.read_text() for p in directory.iterdir()}


def test_replace_dir_swaps_in_the_new_directory(tmp_path):
    target, tmp = tmp_path / "tok", tmp_path / ".tok.tmp"
    tmp.mkdir()
    (tmp / "a.json").write_text("first")
    replace_dir(tmp, target)  # no old directory yet
    assert _tree(target) == {"a.json": "first"} and not tmp.exists()
    tmp.mkdir()
    (tmp / "b.json").write_text("second")
    replace_dir(tmp, target)
    assert _tree(target) == {"b.json": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"], "the old directory is deleted"


def test_replace_dir_restores_the_old_directory_when_the_move_fails(tmp_path, monkeypatch):
    target, tmp = tmp_path / "tok", tmp_path / ".tok.tmp"
    target.mkdir()
    (target / "a.json").write_text("old")
    tmp.mkdir()
    (tmp / "a.json").write_text("new")
    real_replace, calls = os.replace, []

    def second_call_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moves the old directory aside, the second moves the new one in
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_call_fails)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(tmp, target)
    monkeypatch.undo()
    assert len(calls) == 3, "old aside, new in (fails), old back"
    assert _tree(target) == {"a.json": "old"}
    assert _tree(tmp) == {"a.json": "new"}, "the caller still owns tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tok.tmp", "tok"], "no stray .old directory"
