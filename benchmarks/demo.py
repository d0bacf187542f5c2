"""The demo figures of docs/measured.md: wall-clock of `python -m pretrain` from nothing and CPU throughput.

    python benchmarks/demo.py --out benchmarks/results/demo.json

Runs the embedded default exactly as `make demo` does, but in fresh artifact and run directories, so the
tokenizer and the shards are built too. Reports the wall-clock of each stage (from the log), the median
training tokens/s after the first 10 steps (2 ranks, ZeRO-3, gloo), and the final validation loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds(stamp: str) -> float:
    t = datetime.strptime(stamp, "%H:%M:%S")
    return t.hour * 3600 + t.minute * 60 + t.second


@contextlib.contextmanager
def _kept(directory: Path):
    yield str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--keep", type=Path, default=None, help="run in this (empty) directory and keep artifacts/ and runs/"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to `python -m pretrain`")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any((args.keep / name).exists() for name in ("artifacts", "runs")):
            sys.exit(f"{args.keep} already has artifacts/ or runs/: the demo must start from nothing")
    context = tempfile.TemporaryDirectory(prefix="demo-bench-") if args.keep is None else None
    with context if context is not None else _kept(args.keep) as tmp:
        cmd = [sys.executable, "-m", "pretrain", f"paths.artifacts={tmp}/artifacts", f"paths.runs={tmp}/runs"]
        cmd += args.overrides
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
        run_dir = next(Path(tmp, "runs").iterdir())
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    log = result.stderr
    stamps = {
        name: seconds(m.group(1))
        for name, pattern in {
            "start": r"^(\d\d:\d\d:\d\d) ",
            "tokenizer_done": r"^(\d\d:\d\d:\d\d) .*llm.tokenizer: (trained|reusing) ",
            "shards_done": r"^(\d\d:\d\d:\d\d) .*llm.launch: starting",
            "training_start": r"^(\d\d:\d\d:\d\d) .*llm.trainer: training ",
            "training_done": r"^(\d\d:\d\d:\d\d) .*trained \d+ steps",
        }.items()
        if (m := re.search(pattern, log, re.MULTILINE))
    }
    steady = [m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m and m["step"] > 10]
    val = [m for m in metrics if "val/loss" in m]
    figures = {
        "command": "python -m pretrain " + " ".join(args.overrides),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "wall_clock_s": round(wall, 1),
        "stages_s": {
            "tokenizer": stamps.get("tokenizer_done", 0) - stamps.get("start", 0),
            "shards": stamps.get("shards_done", 0) - stamps.get("tokenizer_done", 0),
            "startup": stamps.get("training_start", 0) - stamps.get("shards_done", 0),
            "training": stamps.get("training_done", 0) - stamps.get("training_start", 0),
        },
        "steps": max(m["step"] for m in metrics),
        "tokens": max(m.get("train/tokens", 0) for m in metrics),  # the last step is always logged
        "train_tokens_per_s_median": round(statistics.median(steady), 1) if steady else None,
        "first_val_loss": val[0]["val/loss"] if val else None,
        "final_val_loss": val[-1]["val/loss"] if val else None,
        "final_val_perplexity": val[-1]["val/perplexity"] if val else None,
        "sample": log[log.find("sample:") :].strip()[:400] if "sample:" in log else None,
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
