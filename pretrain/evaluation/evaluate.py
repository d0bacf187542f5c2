"""Held-out perplexity of a checkpoint, overall and per source: `python -m pretrain.evaluate runs/<name>`.

One process, no DeepSpeed engine: the ZeRO shards are consolidated into fp32 weights (`pretrain.checkpoint`)
and loaded into our own `Transformer`, on CUDA when available (bf16 autocast, as in training) or on CPU (fp32).

By default it scores the same sequences the trainer's `val/<source>/loss` covers: the first
`train.eval_batches` global batches of each source's own validation split (of the world size that wrote the
checkpoint), and "overall" is their token-weighted mean, like the trainer's `val/loss`. `batches=N` and
`sequences=N` (per source; 0 = the whole split) change that. `texts=[files or globs]` scores those files
instead, each one held-out document encoded and cut into windows as training data was, every token but its
first scored once.

`long_context=true` measures instead whether the model uses its context (`pretrain.evaluation.long_report`): loss by
position over held-out documents, a copy probe and a passkey grid, written as `long_context.json` and PNGs to
`<run>/eval/<checkpoint>/` (or `eval_dir`), with a summary on stderr.

For a Mixture-of-Experts run, either report also draws the expert load by layer over training from the run's
step log (`pretrain.evaluation.expert_load`) as `expert_load.png` in that directory.

A key the chosen report would not read (`length` without `long_context`, `batches` with it) is refused, not
ignored.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from data.atomic_io import atomic_write_json, atomic_write_text
from data.loader import IGNORE_INDEX, collate
from data.log import get_logger
from data.mixture import MixtureDataset
from data.packing import ArrayDocumentStore, DocumentStore, materialize, pack_concat
from data.tokenize_pool import encode_documents
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import Checkpoint, find_checkpoint, load_trained
from pretrain.config import ConfigError, PretrainConfig, require
from pretrain.evaluation.cli import hydra_command
from pretrain.evaluation.expert_load import write_expert_load
from pretrain.evaluation.long_eval import held_out_documents
from pretrain.evaluation.long_report import (
    LongContextSettings,
    format_summary,
    long_context_report,
    write_plots,
)
from pretrain.model.transformer import Transformer

log = get_logger(__name__)


@torch.no_grad()
def score(
    model: Transformer,
    dataset: MixtureDataset | PackedDocuments,
    sequences: int,
    micro_batch_size: int,
    device: torch.device,
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
    report = {**report_header(checkpoint, split, dev), "sources": {}}
    for name in data.source_names:
        source = data.for_source(name)
        if sequences is None:
            count = trainer_eval_sequences(len(source), cfg.train.micro_batch_size, world, eval_batches)
        else:
            count = sequences if sequences > 0 else len(source)
        report["sources"][name] = score(model, source, count, micro, dev)
    report["overall"] = combine(report["sources"].values())
    return report


class PackedDocuments:
    """Documents cut as the trainer cuts a long one (`pack_concat`): windows of `capacity` tokens that overlap by
    one, so every token but a document's first is a target exactly once, read from the window's position 0."""

    def __init__(self, store: DocumentStore, capacity: int, pad_id: int) -> None:
        self.store, self.pad_id = store, pad_id
        self.index = pack_concat(store.doc_lengths(), capacity, seed=0)

    def __len__(self) -> int:
        return self.index.n_sequences

    def __getitem__(self, seq: int) -> dict[str, np.ndarray]:
        return materialize(self.store, self.index, seq, self.pad_id)


def evaluate_texts(
    path: str | Path,
    texts: list[str],
    *,
    micro_batch_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Loss and perplexity of the files `texts` names (paths or globs), each file reported as its own source.

    A file is one document encoded as the run's were ([BOS] + ids + [EOS]) and cut into the run's
    `data.packing.seq_len`-token windows, so the number is the held-out counterpart of the trainer's loss.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, checkpoint = load_trained(path, dev)
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    micro = micro_batch_size or cfg.train.micro_batch_size
    files = text_files(texts)
    log.info("scoring %s on %d text file(s) (%s)", checkpoint.path, len(files), dev)
    report = {**report_header(checkpoint, None, dev), "texts": list(texts), "sources": {}}
    for file in files:
        store = text_documents([file], tokenizer, info, cfg.data.add_bos)
        windows = PackedDocuments(store, cfg.data.packing.seq_len + 1, info.pad_id)
        report["sources"][file] = score(model, windows, len(windows), micro, dev)
    report["overall"] = combine(report["sources"].values())
    return report


def report_header(checkpoint: Checkpoint, split: str | None, dev: torch.device) -> dict[str, Any]:
    """What every report starts with: which checkpoint was scored, on what, and how."""
    return {
        "run_dir": str(checkpoint.run_dir),
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "split": split,
        "device": str(dev),
        "precision": "bf16-autocast" if dev.type == "cuda" else "fp32",
    }


def evaluate_long_context(
    path: str | Path,
    settings: LongContextSettings,
    *,
    split: str = "val",
    micro_batch_size: int | None = None,
    device: str | None = None,
    max_seq_len: int | None = None,
    texts: list[str] | None = None,
) -> dict[str, Any]:
    """The long-context report (`pretrain.evaluation.long_report`) of a run's newest usable checkpoint (or the given one),
    on the split's documents, with where it comes from; `micro_batch_size` defaults to the run's.

    `max_seq_len` runs the model past the window it was built with (RoPE has no table to outgrow), to see how
    a model trained on short sequences does on long ones. `texts` (files or globs, one document each) replace
    the split's documents for the loss by position: held-out text of your choice, encoded as the run's
    documents were."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, checkpoint = load_trained(path, dev)
    if max_seq_len:
        model.cfg = dataclasses.replace(model.cfg, max_seq_len=max_seq_len)
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    source = f"{len(texts)} text pattern(s)" if texts else f"the {split} split"
    log.info("long-context evaluation of %s on %s (%s)", checkpoint.path, source, dev)
    report = {
        **report_header(checkpoint, split, dev),
        "train_seq_len": cfg.data.packing.seq_len,
        "texts": list(texts or []),
    }
    if texts:
        documents = {"texts": text_documents(texts, tokenizer, info, cfg.data.add_bos)}
    else:
        documents = held_out_documents(cfg.data, info, split)
    micro = micro_batch_size or cfg.train.micro_batch_size
    report.update(
        long_context_report(
            model, tokenizer, info, documents, settings, add_bos=cfg.data.add_bos, micro_batch_size=micro
        )
    )
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


def what_was_scored(report: dict[str, Any]) -> str:
    if report["split"] is None:
        return f"{len(report['sources'])} text file(s)"
    return f"{report['split']} split"


def format_table(report: dict[str, Any]) -> str:
    """The report as a small aligned text table."""
    rows = [("overall", report["overall"]), *report["sources"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{what_was_scored(report)}, step {report['step']}, {report['checkpoint']}",
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
class EvaluateConfig(LongContextSettings):
    """`python -m pretrain.evaluate`: which run or checkpoint, which split, and how much of it; with
    `long_context=true`, the long-context measurements (their keys come from `LongContextSettings`)."""

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
    # Loss by position, copy probe and passkey grid instead of the per-source loss; unset, what the run was
    # trained to be evaluated on (its train.eval_long_context, set by long-context stages such as demo_long).
    long_context: bool | None = None
    # Where long_context.json and its PNGs go (default: <run>/eval/<checkpoint tag>/).
    eval_dir: str | None = None
    # Other long_context.json files (or directories holding one) overlaid on the loss-by-position plot.
    compare: list[str] = field(default_factory=list)
    # Run the model past the window it was built with (e.g. 1024 for a model trained at 256).
    max_seq_len: int | None = None
    # Held-out text files or globs, one document each, scored instead of the split (per file, or with
    # long_context=true for the loss by position).
    texts: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        require(self.split in ("val", "train"), "split", f"must be 'val' or 'train', got {self.split!r}")
        require(
            not (self.long_context and self.out),
            "out",
            "is the per-source report's file; with long_context=true the report goes to eval_dir",
        )
        for key in ("batches", "sequences", "micro_batch"):
            value = getattr(self, key)
            require(value is None or value >= 0, key, f"must be >= 0, got {value}")


# Keys only one of the two reports reads (`check_options` refuses them with the other).
PER_SOURCE_ONLY = ("batches", "sequences", "out")
LONG_CONTEXT_ONLY = (
    *(f.name for f in dataclasses.fields(LongContextSettings)),
    "eval_dir",
    "compare",
    "max_seq_len",
)


def _default(config: EvaluateConfig, key: str) -> Any:
    spec = next(f for f in dataclasses.fields(config) if f.name == key)
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def check_options(config: EvaluateConfig, long_context: bool) -> None:
    """Refuse a key the chosen report would not read, so that no option is silently ignored; `long_context`
    is the report chosen (given, or the run's own `train.eval_long_context`)."""
    if long_context:
        for key in PER_SOURCE_ONLY:
            require(
                getattr(config, key) is None,
                key,
                "is read by the per-source report only; the long-context report (long_context=true, or a run "
                "trained with train.eval_long_context) ignores it: drop it, or add long_context=false",
            )
    else:
        for key in LONG_CONTEXT_ONLY:
            require(
                getattr(config, key) == _default(config, key),
                key,
                "is read only by the long-context report: add long_context=true, or drop it",
            )
    if config.texts:
        require(config.split == "val", "split", "names the run's split, which texts=[...] replaces: drop one")
        for key in ("batches", "sequences"):
            require(
                getattr(config, key) is None, key, "does not apply to texts=[...], which are scored whole"
            )


def text_files(patterns: list[str]) -> list[str]:
    """The files that paths or globs name, sorted; none at all is an error that names the key."""
    files = sorted(
        {p for pattern in patterns for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}
    )
    if not files:
        raise ConfigError(f"texts: no file matches {patterns}")
    return files


def text_documents(patterns: list[str], tokenizer: Any, info: Any, add_bos: bool) -> ArrayDocumentStore:
    """Files (paths or globs, in sorted order) as documents encoded like the run's: [BOS] + ids + [EOS]."""
    files = text_files(patterns)
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    bos = info.bos_id if add_bos else None
    tokens, lengths = encode_documents(tokenizer, texts, info.eos_id, np.dtype(np.int64), bos)
    return ArrayDocumentStore(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def _run_long_context(config: EvaluateConfig) -> dict[str, Any]:
    compare = [_read_report(path) for path in config.compare]  # a wrong path fails before the model loads
    report = evaluate_long_context(
        config.run,
        config,
        split=config.split,
        micro_batch_size=config.micro_batch,
        device=config.device,
        max_seq_len=config.max_seq_len,
        texts=config.texts,
    )
    directory = Path(config.eval_dir or Path(report["run_dir"]) / "eval" / Path(report["checkpoint"]).name)
    atomic_write_json(directory / "long_context.json", report)
    plots = write_plots(report, directory, compare)
    sys.stderr.write(format_summary(report) + "\n")
    sys.stderr.write(f"wrote {', '.join(str(p) for p in [directory / 'long_context.json', *plots])}\n")
    return report


def _read_report(path: str) -> dict[str, Any]:
    """A long_context.json, given as the file or the directory holding it."""
    file = Path(path) / "long_context.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"compare: no long-context report at {file}")
    return json.loads(file.read_text())


def wants_long_context(config: EvaluateConfig, run_config: PretrainConfig) -> bool:
    """`long_context` as given, or else the run's own choice: a long-context stage gets the long-context suite."""
    if config.long_context is not None:
        return config.long_context
    return run_config.train.eval_long_context


def _run(config: EvaluateConfig) -> dict[str, Any]:
    checkpoint = find_checkpoint(config.run)  # chosen (and any broken newer one named) once
    config = dataclasses.replace(config, run=str(checkpoint.path))
    long_context = wants_long_context(config, checkpoint.config())
    check_options(config, long_context)
    tag = f"{checkpoint.run_dir.name} step {checkpoint.step}"
    eval_dir = Path(config.eval_dir or checkpoint.run_dir / "eval" / checkpoint.path.name)
    if (plot := write_expert_load(checkpoint.run_dir, eval_dir, f"Expert load by layer, {tag}")) is not None:
        sys.stderr.write(f"wrote {plot}\n")
    if long_context:
        return _run_long_context(config)
    if config.texts:
        report = evaluate_texts(
            config.run, config.texts, micro_batch_size=config.micro_batch, device=config.device
        )
    else:
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
