"""The MoE claim on the embedded corpus: more capacity for the same compute, measured rather than assumed.

    python benchmarks/moe_demo.py --out benchmarks/results/moe_demo.json

Trains four models one after another on the same tokenizer, shards and token budget as `make demo` (2 local
ZeRO-3 ranks on CPU, the demo's 800K tokens), and reports for each the held-out loss, training tokens/s and
the experts' load:

* `dense`: the demo (4 layers, SwiGLU of width 352);
* `moe`: `+experiment=demo_moe`, 8 experts of width 176 with top-2, so the same active parameters per token as
  `dense` (2 x 176 = 352 hidden units) plus a router, and about 4x its feed-forward parameters;
* `moe_no_balance`: the same without the load-balancing loss (`model.moe.load_balance_coef=0`);
* `dense_equal_total`: a dense model with as many parameters in total as `moe` (SwiGLU width 8 x 176 = 1408),
  about 4x the feed-forward compute of the others.

The load is the busiest expert's share of assignments over the mean share (1 = balanced, 8 = all on one),
averaged over layers and over the last 10 logged steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "dense": [],
    "moe": ["+experiment=demo_moe"],
    "moe_no_balance": ["+experiment=demo_moe", "model.moe.load_balance_coef=0"],
    "dense_equal_total": ["model.ffn_dim=1408", "train.run_name=demo_dense_1408"],
}


def run_case(name: str, overrides: list[str], workdir: Path, extra: list[str]) -> dict:
    runs = workdir / "runs" / name
    cmd = [sys.executable, "-m", "pretrain", f"paths.artifacts={workdir}/artifacts", f"paths.runs={runs}"]
    cmd += overrides + extra + ["train.sample_tokens=0"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    run_dir = next(runs.iterdir())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "model_summary.json").read_text())
    steady = [m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m and m["step"] > 10]
    val = [m for m in metrics if "val/loss" in m]
    loads = [m for m in metrics if "moe/max_load" in m][-10:]
    layer_loads = [
        statistics.mean(v for k, v in m.items() if k.startswith("moe/max_load/layer")) for m in loads
    ]
    return {
        "command": "python -m pretrain " + " ".join(overrides + extra),
        "parameters": summary.get("parameters"),
        "active_parameters": summary.get("active_parameters", summary.get("parameters")),
        "wall_clock_s": round(wall, 1),
        "steps": max(m["step"] for m in metrics),
        "tokens": max(m.get("train/tokens", 0) for m in metrics),
        "train_tokens_per_s_median": round(statistics.median(steady), 1) if steady else None,
        "final_val_loss": val[-1]["val/loss"] if val else None,
        "final_train_loss": [m["train/loss"] for m in metrics if "train/loss" in m][-1],
        "expert_max_load_mean": round(statistics.mean(layer_loads), 3) if layer_loads else None,
        "load_balance_loss_last": loads[-1]["moe/load_balance_loss"] if loads else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every case")
    args = parser.parse_args()
    import torch

    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="moe-demo-") as tmp:
        for name in args.cases:  # the first case builds the tokenizer and shards, the others reuse them
            figures["cases"][name] = run_case(name, CASES[name], Path(tmp), args.overrides)
            print(name, json.dumps(figures["cases"][name]), flush=True)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
