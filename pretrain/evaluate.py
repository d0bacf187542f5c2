"""Held-out perplexity of a checkpoint, overall and per source: `python -m pretrain.evaluate <run or checkpoint>`.

One process, no DeepSpeed engine: the ZeRO shards are consolidated into fp32 weights (`pretrain.export`) and
loaded into our own `Transformer`, on CUDA when available (bf16 autocast, as in training) or on CPU (fp32).

By default it scores the same sequences the trainer's `val/<source>/loss` covers: the first
`train.eval_batches` global batches of each source's own validation split (the world size comes from the run's
`model_summary.json`), and "overall" is their token-weighted mean, like the trainer's `val/loss`. `--batches`
and `--sequences` (per source; 0 = the whole split) change that.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from data.config import ConfigError
from data.loader import IGNORE_INDEX, collate
from data.log import get_logger, setup_logging
from data.mixture import MixtureDataset
from data.tokenizer import TokenizerError, load_tokenizer
from pretrain.export import ExportError, find_checkpoint, load_model, run_config
from pretrain.model import Transformer

log = get_logger(__name__)


def trainer_world_size(run_dir: Path) -> int:
    """How many ranks trained the run (recorded by the trainer), 1 when unknown."""
    try:
        return int(json.loads((run_dir / "model_summary.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError):
        return 1


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
    """Loss and perplexity of a run's newest committed checkpoint (or the given one) on a split, per source too.

    `sequences` (0 = the whole split) wins over `batches` (default `train.eval_batches`) global batches of
    `train.micro_batch_size * world_size` sequences. `micro_batch_size` is the rows per forward pass (default
    `train.micro_batch_size`); it changes memory and speed, not the result.
    """
    checkpoint = find_checkpoint(path)
    cfg = run_config(checkpoint)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = trainer_world_size(checkpoint.run_dir)
    _, info = load_tokenizer(cfg.tokenizer.dir)
    data = MixtureDataset.from_tokenizer(cfg.data, info, split=split)
    model = load_model(checkpoint, cfg, dev)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate",
        description="Held-out loss and perplexity of a checkpoint, overall and per source. The table goes to "
        "stderr, the JSON report to stdout (or --out).",
    )
    parser.add_argument(
        "path", help="a run directory (newest committed checkpoint) or one checkpoint directory"
    )
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument(
        "--batches", type=int, default=None, help="global batches to score (default: train.eval_batches)"
    )
    parser.add_argument(
        "--sequences", type=int, default=None, help="sequences per set; overrides --batches (0 = whole split)"
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="rows per forward pass (default: train.micro_batch_size)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", default=None, help="write the JSON report to this file instead of stdout")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        report = evaluate(
            args.path,
            split=args.split,
            batches=args.batches,
            sequences=args.sequences,
            micro_batch_size=args.micro_batch,
            device=args.device,
        )
    except (ExportError, ConfigError, TokenizerError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    sys.stderr.write(format_table(report) + "\n")
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
