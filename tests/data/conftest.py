"""Fixtures of the data tests: a tiny trained tokenizer and a generated corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data.tokenizer import train_tokenizer
from tests.data.prepare_corpus import prepare_config, random_text, write_corpus


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE trained once on a generated corpus."""
    tmp = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    corpus = tmp / "train.jsonl"
    write_corpus(corpus, [random_text(rng) for _ in range(300)])
    train_tokenizer(prepare_config(tmp, corpus, tmp / "bpe300"))
    return tmp / "bpe300"


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(250)]
    path = tmp_path / "corpus" / "web.jsonl"
    write_corpus(path, texts)
    return path, texts
