"""The resume-across-world-sizes figures of docs/measured.md: time and disk of the universal conversion.

    python benchmarks/reshard.py --out benchmarks/results/reshard.json

For each model (tiny, the CPU demo's, and 125m) the real trainer runs one optimizer step on 2 ZeRO-3 ranks
over the embedded corpus and commits a checkpoint; then the same run resumes on 1 rank, which converts that
checkpoint into its universal copy (`pretrain.checkpoint.reshard`) and trains one more step. Reported per model: the
checkpoint's size, the universal copy's size, the conversion time (from the trainer's start-up line), and the
wall-clock of the resumed start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("tiny", "125m")
CONVERTED = re.compile(r"written by (\d+) ranks, this run has (\d+): converted in ([\d.]+) s \(([\d.]+) MB")


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def train(tmp: Path, model: str, ranks: int, tokens: int) -> tuple[str, float]:
    cmd = [
        sys.executable, "-m", "pretrain", f"model={model}", "data.packing.seq_len=256",
        "train.global_batch_tokens=512", "train.start_batch_tokens=0", "train.micro_batch_size=1",
        f"train.total_tokens={tokens}", "train.eval_every_steps=0", "train.sample_tokens=0",
        "train.run_name=reshard", f"train.local_processes={ranks}", "logging.wandb_mode=disabled",
        "data.repetition_policy=warn", f"paths.artifacts={ROOT / 'artifacts'}", f"paths.runs={tmp}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return result.stderr, time.perf_counter() - started


def measure(model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="reshard-bench-") as tmp:
        train(Path(tmp), model, 2, 512)
        checkpoint = max((Path(tmp) / "reshard" / "checkpoints").glob("step_*"))
        log, wall = train(Path(tmp), model, 1, 1024)
        found = CONVERTED.search(log)
        if found is None:
            sys.exit(f"no conversion in the resumed run's log:\n{log[-3000:]}")
        summary = json.loads((Path(tmp) / "reshard" / "model_summary.json").read_text())
        return {
            "model": model,
            "parameters": summary["parameters"],
            "from_ranks": int(found.group(1)),
            "to_ranks": int(found.group(2)),
            "checkpoint_mb": size_mb(checkpoint),
            "universal_mb": float(found.group(4)),
            "conversion_s": float(found.group(3)),
            "resumed_start_wall_s": wall,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    import torch

    rows = [measure(model) for model in args.models]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python benchmarks/reshard.py",
        "rows": rows,
    }
    for row in rows:
        print(
            f"{row['model']:>5} ({row['parameters'] / 1e6:.1f}M): {row['from_ranks']} -> {row['to_ranks']} ranks, "
            f"checkpoint {row['checkpoint_mb']:.1f} MB, universal copy {row['universal_mb']:.1f} MB, "
            f"conversion {row['conversion_s']:.1f} s"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
