"""Held-out perplexity of a checkpoint, overall and per source: `python -m pretrain.evaluate runs/<name>`.

One process, no DeepSpeed engine: the ZeRO shards are consolidated into fp32 weights (`pretrain.checkpoint`)
and loaded into our own `Transformer`, on CUDA when available (bf16 autocast, as in training) or on CPU (fp32).

By default it scores the same sequences the trainer's `val/<source>/loss` covers: the first
`train.eval_batches` global batches of each source's own validation split (of the world size that wrote the
checkpoint), and "overall" is their token-weighted mean, like the trainer's `val/loss`. `batches=N` and
`sequences=N` (per source; 0 = the whole split) change that.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from data.atomic_io import atomic_write_text
from data.loader import IGNORE_INDEX, collate
from data.log import get_logger
from data.mixture import MixtureDataset
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import load_trained
from pretrain.cli import hydra_command
from pretrain.config import require
from pretrain.model import Transformer

log = get_logger(__name__)


@torch.no_grad()
def score(
    model: Transformer, dataset: MixtureDataset, sequences: int, micro_batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Token-weighted mean next-token loss over the first `sequences` samples of `dataset`."""
    sequences = min(sequences, len(dataset))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total, tokens = 0.0, 0
    for start in range(0, sequences, micro_batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + micro_batch_size, sequences))])
        batch = {k: v.to(device) for k, v in batch.items()}
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        if count == 0:
            continue
        with autocast:
            loss = model(
                batch["input_ids"],
                position_ids=batch["position_ids"],
                document_ids=batch["document_ids"],
                labels=batch["labels"],
            )
        total += float(loss) * count
        tokens += count
    loss = total / tokens if tokens else None
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if loss is not None else None,
        "tokens": tokens,
        "sequences": sequences,
    }


def evaluate(
    path: str | Path,
    *,
    split: str = "val",
    batches: int | None = None,
    sequences: int | None = None,
    micro_batch_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Loss and perplexity of a run's newest usable checkpoint (or the given one) on a split, per source too.

    `sequences` (0 = the whole split) wins over `batches` (default `train.eval_batches`) global batches of
    `train.micro_batch_size * world_size` sequences. `micro_batch_size` is the rows per forward pass (default
    `train.micro_batch_size`); it changes memory and speed, not the result.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, checkpoint = load_trained(path, dev)
    world = max(1, checkpoint.world_size)
    _, info = load_tokenizer(cfg.tokenizer.dir)
    data = MixtureDataset.from_tokenizer(cfg.data, info, split=split)
    micro = micro_batch_size or cfg.train.micro_batch_size
    eval_batches = cfg.train.eval_batches if batches is None else batches
    log.info("scoring %s on the %s split (%s)", checkpoint.path, split, dev)
    report: dict[str, Any] = {
        "run_dir": str(checkpoint.run_dir),
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "split": split,
        "device": str(dev),
        "precision": "bf16-autocast" if dev.type == "cuda" else "fp32",
        "sources": {},
    }
    for name in data.source_names:
        source = data.for_source(name)
        if sequences is None:
            count = trainer_eval_sequences(len(source), cfg.train.micro_batch_size, world, eval_batches)
        else:
            count = sequences if sequences > 0 else len(source)
        report["sources"][name] = score(model, source, count, micro, dev)
    report["overall"] = combine(report["sources"].values())
    return report


def trainer_eval_sequences(available: int, micro_batch_size: int, world_size: int, eval_batches: int) -> int:
    """How many sequences of one source the trainer's `val/<source>/loss` covers (see `Trainer.evaluate`)."""
    per_rank = min(micro_batch_size, available // world_size)
    if per_rank == 0:
        return 0
    batch = per_rank * world_size
    return min(eval_batches, available // batch) * batch


def combine(results: Any) -> dict[str, Any]:
    """Token-weighted overall loss of several scored sets (the trainer's `val/loss`)."""
    results = [r for r in results if r["tokens"]]
    tokens = sum(r["tokens"] for r in results)
    loss = sum(r["loss"] * r["tokens"] for r in results) / tokens if tokens else None
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if loss is not None else None,
        "tokens": tokens,
        "sequences": sum(r["sequences"] for r in results),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a small aligned text table."""
    rows = [("overall", report["overall"]), *report["sources"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{report['split']} split, step {report['step']}, {report['checkpoint']}",
        f"{'set':<{width}}  {'sequences':>9}  {'tokens':>9}  {'loss':>8}  {'perplexity':>11}",
    ]
    for name, result in rows:
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
        ppl = "n/a" if result["perplexity"] is None else f"{result['perplexity']:.2f}"
        lines.append(
            f"{name:<{width}}  {result['sequences']:>9}  {result['tokens']:>9}  {loss:>8}  {ppl:>11}"
        )
    return "\n".join(lines)


@dataclass
class EvaluateConfig:
    """`python -m pretrain.evaluate`: which run or checkpoint, which split, and how much of it."""

    # A run directory (its newest usable committed checkpoint) or one checkpoint directory.
    run: str = MISSING
    split: str = "val"
    # Global batches to score per source (default: the run's train.eval_batches).
    batches: int | None = None
    # Sequences per source; wins over `batches` (0 = the whole split).
    sequences: int | None = None
    # Rows per forward pass (default: the run's train.micro_batch_size).
    micro_batch: int | None = None
    # cpu, cuda or cuda:N (default: cuda when available).
    device: str | None = None
    # Write the JSON report here instead of stdout.
    out: str | None = None
    log_level: str = "INFO"

    def validate(self) -> None:
        require(self.split in ("val", "train"), "split", f"must be 'val' or 'train', got {self.split!r}")
        for key in ("batches", "sequences", "micro_batch"):
            value = getattr(self, key)
            require(value is None or value >= 0, key, f"must be >= 0, got {value}")


def _run(config: EvaluateConfig) -> dict[str, Any]:
    report = evaluate(
        config.run,
        split=config.split,
        batches=config.batches,
        sequences=config.sequences,
        micro_batch_size=config.micro_batch,
        device=config.device,
    )
    sys.stderr.write(format_table(report) + "\n")
    text = json.dumps(report, indent=2) + "\n"
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.out), text)
    else:
        sys.stdout.write(text)
    return report


main = hydra_command("evaluate", EvaluateConfig, _run)

if __name__ == "__main__":
    main()
