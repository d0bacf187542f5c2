"""Expert load over training, read back from a run's step log: how the router spread the tokens, layer by layer.

The trainer logs, each step, every MoE layer's share of the token-to-expert assignments per expert
(`moe/share/layer{L}/expert{E}`) and the busiest expert's load over the mean (`moe/max_load/layer{L}`; 1 is
perfect balance, E one expert taking everything). `evaluate` draws them as `expert_load.png`: one panel per
layer, the shares stacked to 1 over the steps, with the max load on a second axis. A collapsing router shows as
one band swallowing the others.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pretrain.evaluation.long_report import new_figure, save_png

SHARE = re.compile(r"^moe/share/layer(\d+)/expert(\d+)$")


def expert_load_history(metrics_file: str | Path) -> dict[int, dict[str, Any]]:
    """Per MoE layer: `steps`, `shares` (one list of per-expert shares per step) and `max_load`; empty for a
    dense run. Lines a crash tore are skipped."""
    history: dict[int, dict[str, Any]] = {}
    for line in Path(metrics_file).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        shares: dict[int, dict[int, float]] = {}
        for key, value in record.items():
            if match := SHARE.match(key):
                shares.setdefault(int(match[1]), {})[int(match[2])] = value
        for layer, by_expert in shares.items():
            entry = history.setdefault(layer, {"steps": [], "shares": [], "max_load": []})
            entry["steps"].append(record["step"])
            entry["shares"].append([by_expert[e] for e in sorted(by_expert)])
            entry["max_load"].append(record.get(f"moe/max_load/layer{layer}", float("nan")))
    return dict(sorted(history.items()))


def plot_expert_load(history: dict[int, dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per layer: expert shares stacked over the steps, the max load (right axis) as a black line."""
    layers = list(history)
    figure, axes = new_figure(7.0, 1.2 + 2.0 * len(layers))
    figure.delaxes(axes)
    panels = figure.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, layer in zip(panels, layers, strict=True):
        entry = history[layer]
        columns = list(zip(*entry["shares"], strict=True))
        ax.stackplot(entry["steps"], columns, labels=[f"expert {e}" for e in range(len(columns))])
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel(f"layer {layer}\nshare")
        load = ax.twinx()
        load.plot(entry["steps"], entry["max_load"], color="black", linewidth=1.0)
        load.set_ylabel("max load")
        load.set_ylim(bottom=1.0)
    panels[0].set_title(title)
    panels[0].legend(loc="upper left", fontsize=7, ncols=min(8, len(history[layers[0]]["shares"][0])))
    panels[-1].set_xlabel("step")
    return save_png(figure, path)


def write_expert_load(run_dir: str | Path, directory: str | Path, title: str) -> Path | None:
    """`directory`/expert_load.png from the run's metrics.jsonl; None for a run with no MoE layer."""
    metrics = Path(run_dir) / "metrics.jsonl"
    history = expert_load_history(metrics) if metrics.is_file() else {}
    if not history:
        return None
    return plot_expert_load(history, Path(directory) / "expert_load.png", title)
