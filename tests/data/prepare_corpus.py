"""A small generated JSONL corpus and the data config the prepare tests run on."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.cli import compose_data_config

WORDS = ["the", "a", "of", "data", "token", "shard", "python", "über", "naïve", "数据", "café", "🙂"]
WORDS += ["résumé", "loss", "model", "42", "x=1;", "def", "f():", "return"]


def random_text(rng: random.Random, max_words: int = 60) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
    return " ".join(words) + rng.choice(["", ".", "\n", "\n\nend"])


def write_corpus(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )


def prepare_config(tmp: Path, corpus: Path, tokenizer_dir: Path, *extra: str):
    return compose_data_config(
        [
            "data=local_jsonl",
            f"data.sources.web.paths=[{corpus}]",
            f"paths.artifacts={tmp / 'artifacts'}",
            f"tokenizer.dir={tokenizer_dir}",
            "tokenizer.vocab_size=300",
            "tokenizer.byte_budget=100000",
            "data.docs_per_shard=40",
            "data.val_fraction=0.1",
            "data.num_workers=2",
            *extra,
        ]
    )


def shard_files(cfg) -> dict[str, tuple[int, bytes]]:
    """Every shard of the `web` source: name -> (mtime, bytes), to see what a re-run rewrote."""
    directory = Path(cfg.data.shards_dir) / "web"
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.glob("*.bin"))}
