"""The per-source manifest: `load_split` opens exactly the shards it lists, and says clearly when it cannot."""

from __future__ import annotations

import numpy as np
import pytest

from data.manifest import load_split, manifest_path, shard_entry, write_manifest
from data.shard_writer import write_shard
from data.shards import ShardError, shard_path

FP = "ab" * 32
OTHER_FP = "cd" * 32


def _docs(lengths: list[int], vocab: int = 1000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n, dtype=np.int64) for n in lengths]


def _manifest_for(tmp_path, source="web"):
    entries = []
    for i, lengths in enumerate([(2, 5), (4,)]):
        stats = write_shard(
            shard_path(tmp_path, source, "train", i),
            _docs(list(lengths), seed=i),
            vocab_size=1000,
            fingerprint=FP,
        )
        entries.append(shard_entry(stats))
    manifest = {
        "source": source,
        "tokenizer_fingerprint": FP,
        "splits": {
            "train": {"docs": 3, "tokens": 11, "shards": entries},
            "val": {"docs": 0, "tokens": 0, "shards": []},
        },
    }
    write_manifest(tmp_path, source, manifest)
    return manifest


def test_load_split(tmp_path):
    _manifest_for(tmp_path)
    shards = load_split(tmp_path, "web", "train", expected_fingerprint=FP)
    assert [s.path.name for s in shards] == ["train-00000.bin", "train-00001.bin"]
    assert [s.n_docs for s in shards] == [2, 1]
    assert load_split(tmp_path, "web", "val", expected_fingerprint=None) == []
    with pytest.raises(ShardError, match=r"manifest\.json: shards were made with tokenizer"):
        load_split(tmp_path, "web", "train", expected_fingerprint=OTHER_FP)


def test_load_split_errors(tmp_path):
    with pytest.raises(ShardError, match=r"no manifest for source 'web'.*python -m data\.prepare"):
        load_split(tmp_path, "web", "train", expected_fingerprint=FP)
    manifest = _manifest_for(tmp_path)
    manifest["splits"]["train"]["shards"][1]["tokens"] = 99
    write_manifest(tmp_path, "web", manifest)
    with pytest.raises(ShardError, match=r"train-00001\.bin: does not match its manifest entry"):
        load_split(tmp_path, "web", "train", expected_fingerprint=FP)
    shard_path(tmp_path, "web", "train", 1).unlink()
    with pytest.raises(ShardError, match=r"train-00001\.bin: shard file is missing"):
        load_split(tmp_path, "web", "train", expected_fingerprint=FP)
    manifest_path(tmp_path, "web").write_text("{not json")
    with pytest.raises(ShardError, match="unreadable manifest"):
        load_split(tmp_path, "web", "train", expected_fingerprint=FP)
