"""The long-context report: what to measure, all of it as one dict, and that dict as text and PNGs.

`long_context_report` runs the measurements of `pretrain.evaluation.long_eval` with `LongContextSettings` and returns a
JSON-ready dict; like them it reads no file and writes none, seeds every random choice and does the same on
every rank, so the trainer can call it on its ZeRO-3 model on every rank and let rank 0 write. `write_plots`
and `format_summary` turn a report (or several, overlaid) into PNGs and a short table; matplotlib is imported
only there, with its Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic_io import atomic_write_bytes
from data.log import get_logger
from pretrain.config import require
from pretrain.evaluation.long_eval import (
    ANSWER_SLACK,
    DEPTH_DEFINITION,
    PasskeyTemplate,
    check_length,
    copy_probe,
    default_copy_distances,
    default_passkey_lengths,
    document_prefixes,
    minimum_passkey_length,
    ordinary_token_ids,
    passkey_grid,
    passkey_keys,
    position_loss,
)
from pretrain.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from data.packing import DocumentStore
    from data.tokenizer import TokenizerInfo

log = get_logger(__name__)


# -- the suite --------------------------------------------------------------------------------------


@dataclass
class LongContextSettings:
    """What `long_context_report` measures (the keys of `python -m pretrain.evaluate long_context=true`)."""

    # Tokens per sequence for the loss by position (default: the model's max_seq_len; never beyond it).
    length: int | None = None
    # Held-out documents of at least length + 1 tokens to score, one per sequence (0 skips this part).
    position_sequences: int = 64
    # Bucket edges rising from 0 to the length (default: 0, 16, 32, 64, ..., length).
    position_buckets: list[int] | None = None
    # Lengths d of the random X in [BOS] + X + X (default: 16, 32, ... up to length / 2).
    copy_distances: list[int] | None = None
    # Random sequences per distance (0 skips the copy probe).
    copy_trials: int = 16
    # Prompt lengths in tokens (default: 1/4, 1/2, 3/4 and all of the length, less room for the answer).
    passkey_lengths: list[int] | None = None
    # Share of the filler before the key: 0 = right after the intro, 1 = right before the question.
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # Keys per (length, depth) cell, the same keys in every cell (0 skips the passkey test).
    passkey_trials: int = 10
    passkey_digits: int = 5
    passkey_intro: str = PasskeyTemplate.intro
    passkey_filler: str = PasskeyTemplate.filler
    passkey_needle: str = PasskeyTemplate.needle
    passkey_question: str = PasskeyTemplate.question
    # Seeds the choice of documents, the copy sequences and the keys.
    seed: int = 0

    def validate(self) -> None:
        require(self.length is None or self.length >= 2, "length", f"must be at least 2, got {self.length}")
        for key in ("position_sequences", "copy_trials", "passkey_trials"):
            require(getattr(self, key) >= 0, key, f"must be >= 0 (0 skips it), got {getattr(self, key)}")
        require(all(d >= 2 for d in self.copy_distances or []), "copy_distances", "must all be at least 2")
        require(all(n >= 1 for n in self.passkey_lengths or []), "passkey_lengths", "must all be positive")
        require(
            bool(self.passkey_depths) and all(0 <= p <= 1 for p in self.passkey_depths),
            "passkey_depths",
            f"must be a non-empty list of values in [0, 1], got {self.passkey_depths}",
        )
        require(
            1 <= self.passkey_digits <= 18, "passkey_digits", f"must be in [1, 18], got {self.passkey_digits}"
        )
        require("{key}" in self.passkey_needle, "passkey_needle", "must contain {key}, where the key goes")

    def template(self) -> PasskeyTemplate:
        return PasskeyTemplate(
            self.passkey_intro, self.passkey_filler, self.passkey_needle, self.passkey_question
        )


def long_context_report(
    model: Transformer,
    tokenizer: Tokenizer,
    info: TokenizerInfo,
    documents: Mapping[str, DocumentStore],
    settings: LongContextSettings,
    *,
    add_bos: bool = True,
    micro_batch_size: int = 4,
) -> dict[str, Any]:
    """Loss by position, copy probe and passkey grid of `model` as one JSON-ready dict.

    `documents` are held-out document stores (`held_out_documents`); `add_bos` says whether the run's
    documents start with BOS (`data.add_bos`), and then every probe starts with it too. The model's
    train/eval mode is restored on return.
    """
    settings.validate()
    window = model.cfg.max_seq_len
    length = settings.length or window
    check_length(model, length, "length")
    bos = info.bos_id if add_bos else None
    used = {f.name: getattr(settings, f.name) for f in fields(LongContextSettings)}
    report: dict[str, Any] = {"length": length, "max_seq_len": window, "bos": add_bos, "settings": used}
    was_training = model.training
    try:
        if settings.position_sequences:
            sequences, chosen = document_prefixes(
                documents, length, settings.position_sequences, settings.seed
            )
            if not chosen:
                log.warning("no held-out document has %d tokens: no loss by position", length + 1)
            part = position_loss(model, sequences, settings.position_buckets, micro_batch_size)
            report["position_loss"] = {**part, "documents": [[name, i] for name, i in chosen]}
        if settings.copy_trials:
            pool = ordinary_token_ids(tokenizer, min(info.vocab_size, model.cfg.vocab_size))
            distances = settings.copy_distances or default_copy_distances(length)
            report["copy_probe"] = copy_probe(
                model, pool, distances, settings.copy_trials, seed=settings.seed, bos_id=bos,
                micro_batch_size=micro_batch_size,
            )  # fmt: skip
        if settings.passkey_trials:
            report["passkey"] = _passkey_part(model, tokenizer, info, settings, length, bos)
    finally:
        model.train(was_training)
    return report


def _passkey_part(
    model: Transformer,
    tokenizer: Tokenizer,
    info: TokenizerInfo,
    settings: LongContextSettings,
    length: int,
    bos: int | None,
) -> dict[str, Any]:
    keys = passkey_keys(settings.passkey_trials, settings.passkey_digits, settings.seed)
    template = settings.template()
    lengths = settings.passkey_lengths
    if not lengths:
        top = min(length, model.cfg.max_seq_len - settings.passkey_digits - ANSWER_SLACK)
        lengths = default_passkey_lengths(top, minimum_passkey_length(tokenizer, template, keys, bos))
        if not lengths:
            reason = (
                f"no prompt of at most {top} tokens holds the template; set passkey_lengths or shorten it"
            )
            log.warning("passkey test skipped: %s", reason)
            return {"skipped": reason}
    grid = passkey_grid(
        model, tokenizer, template, lengths, settings.passkey_depths, keys, bos_id=bos, eos_id=info.eos_id
    )
    return {"depth_definition": DEPTH_DEFINITION, **grid}


def headline_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """A report's numbers as flat metrics for wandb: loss per position bucket, the copy probe's gain (first
    minus second copy loss) per distance, and the passkey accuracy."""
    metrics: dict[str, float] = {}
    for bucket in report.get("position_loss", {}).get("buckets", []):
        if bucket["loss"] is not None:
            metrics[f"long/loss_{bucket['start']}_{bucket['end']}"] = bucket["loss"]
    for d in report.get("copy_probe", {}).get("distances", []):
        if d["first_copy_loss"] is not None and d["second_copy_loss"] is not None:
            metrics[f"long/copy_gain_{d['distance']}"] = d["first_copy_loss"] - d["second_copy_loss"]
    accuracy = report.get("passkey", {}).get("accuracy")
    if accuracy is not None:
        metrics["long/passkey_accuracy"] = accuracy
    return metrics


# -- text and PNGs ---------------------------------------------------------------------------------------


def report_label(report: Mapping[str, Any]) -> str:
    """A legend label: the run's name and step when the report has them."""
    if "run_dir" in report:
        return f"{Path(report['run_dir']).name} step {report.get('step', '?')}"
    return "model"


def format_summary(report: Mapping[str, Any]) -> str:
    """The report as a few lines of text: loss per bucket, copy losses per distance, passkey accuracy."""
    lines = [f"long context: length {report['length']}, model.max_seq_len {report['max_seq_len']}"]
    part = report.get("position_loss")
    if part:
        cells = [f"[{b['start']},{b['end']}) {_num(b['loss'])}" for b in part["buckets"]]
        lines.append(f"loss by position ({part['sequences']} documents): " + "  ".join(cells))
    part = report.get("copy_probe")
    if part:
        cells = [
            f"d={d['distance']} {_num(d['first_copy_loss'])}->{_num(d['second_copy_loss'])}"
            for d in part["distances"]
        ]
        lines.append("copy probe, first->second copy loss: " + "  ".join(cells))
    part = report.get("passkey")
    if part and "skipped" in part:
        lines.append(f"passkey: skipped ({part['skipped']})")
    elif part:
        lines.append(f"passkey accuracy {_num(part['accuracy'])}; rows: length, columns: depth")
        lines.append(f"{'':>8}" + "".join(f"{d:>7.2f}" for d in part["depths"]))
        for length in part["lengths"]:
            row = [c["accuracy"] for c in part["cells"] if c["length"] == length]
            lines.append(f"{length:>8}" + "".join(f"{a:>7.2f}" for a in row))
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def new_figure(width: float = 7.0, height: float = 4.5) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # the Agg canvas: no display, nothing global

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def save_png(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, [buffer.getvalue()])
    return path


def plot_position_loss(reports: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss against tokens of context, one line per report (bucket means, with the per-position curve faint);
    a dotted line marks each report's training sequence length when it is known."""
    figure, ax = new_figure()
    for index, report in enumerate(reports):
        part = report.get("position_loss") or {}
        if not part.get("sequences"):
            continue
        color = f"C{index % 10}"
        curve = part["per_position"]
        ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.25, linewidth=0.8)
        buckets = [b for b in part["buckets"] if b["loss"] is not None]
        middles = [math.sqrt((b["start"] + 1) * b["end"]) for b in buckets]
        label = f"{report_label(report)} ({part['sequences']} docs)"
        ax.plot(middles, [b["loss"] for b in buckets], "o-", color=color, label=label)
        if report.get("train_seq_len"):
            ax.axvline(report["train_seq_len"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context (position + 1)")
    ax.set_ylabel("next-token loss")
    ax.set_title("Held-out loss by position (dotted: training sequence length)")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no held-out document long enough", ha="center", transform=ax.transAxes)
    return save_png(figure, path)


def plot_copy_probe(report: Mapping[str, Any], path: Path) -> Path:
    """First- and second-copy loss of [BOS] + X + X against the distance d = len(X)."""
    part = report["copy_probe"]
    figure, ax = new_figure()
    distances = [d["distance"] for d in part["distances"]]
    ax.plot(distances, [d["first_copy_loss"] for d in part["distances"]], "o-", label="first copy")
    ax.plot(distances, [d["second_copy_loss"] for d in part["distances"]], "o-", label="second copy")
    ax.axhline(part["chance_loss"], color="gray", linestyle=":", label="uniform guess")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance d (tokens between a token and its copy)")
    ax.set_ylabel("mean loss")
    ax.set_title(f"Copy probe, {report_label(report)}, {part['trials']} sequences per distance")
    ax.legend(fontsize=8)
    return save_png(figure, path)


def plot_passkey(report: Mapping[str, Any], path: Path) -> Path:
    """Passkey accuracy per (prompt length, depth) cell as a heatmap, each cell labelled correct/trials."""
    part = report["passkey"]
    lengths, depths = part["lengths"], part["depths"]
    grid = [[0.0] * len(depths) for _ in lengths]
    figure, ax = new_figure(1.6 + 1.0 * len(depths), 1.6 + 0.6 * len(lengths))
    for cell in part["cells"]:
        row, col = lengths.index(cell["length"]), depths.index(cell["depth"])
        grid[row][col] = cell["accuracy"]
        text = f"{cell['correct']}/{cell['trials']}"
        ax.text(col, row, text, ha="center", va="center", fontsize=8)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth (share of the filler before the key)")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(f"Passkey retrieval, {report_label(report)}")
    figure.colorbar(image, ax=ax, label="exact-match accuracy")
    return save_png(figure, path)


def write_plots(
    report: Mapping[str, Any], directory: str | Path, compare: Sequence[Mapping[str, Any]] = ()
) -> list[Path]:
    """The PNGs of the parts `report` has, in `directory`; `compare` reports join the loss-by-position plot."""
    directory = Path(directory)
    written = []
    if report.get("position_loss") is not None:
        written.append(plot_position_loss([report, *compare], directory / "position_loss.png"))
    if report.get("copy_probe") is not None:
        written.append(plot_copy_probe(report, directory / "copy_probe.png"))
    if report.get("passkey") is not None and "skipped" not in report["passkey"]:
        written.append(plot_passkey(report, directory / "passkey.png"))
    return written
