"""The long-context comparison of docs/measured.md: what the demo's long-context stage bought, against a control.

    python benchmarks/demo.py --keep /tmp/lc               # runs/demo, from nothing (skip if it exists)
    python benchmarks/long_context.py --workdir /tmp/lc --out benchmarks/results/long_context.json

From the finished demo (context 256) it trains, for the same tokens and learning rate:
  (b) control: the demo continued at 256 tokens with its RoPE unchanged;
  (c) the stage `+experiment=demo_long` at 1,024 tokens with each RoPE method: base change (ABF, the recipe),
      position interpolation (x4) and YaRN (x4 over the original 256),
and evaluates (a) the demo itself, (b) and every (c) at 1,024 tokens on the same held-out text: third-party
Python source that none of them trained on (DeepSpeed's runtime package in this environment). Only (c)
trained on long sequences, so (b) vs (c) over positions 512-1023 is what the extension bought. Reported:
loss by position, the copy probe and the passkey grid of each, and each stage's wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "control_256": ["train.run_name=demo_control", "data.packing.seq_len=256", "model.rope_base=10000",
                    "data.packing.short_doc_threshold=0", "data.packing.short_doc_keep=1.0"],
    "stage_abf": ["train.run_name=demo_long"],
    "stage_pi": ["train.run_name=demo_long_pi", "model.rope_base=10000", "model.rope_scaling=4"],
    "stage_yarn": ["train.run_name=demo_long_yarn", "model.rope_base=10000", "model.rope_type=yarn",
                   "model.rope_scaling=4", "model.rope_original_max_seq_len=256"],
}  # fmt: skip
EVAL = ["long_context=true", "length=1024", "position_sequences=64", "copy_trials=8", "passkey_trials=3",
        "passkey_lengths=[256,512,1000]"]  # fmt: skip


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def bucket(report: dict, start: int, end: int) -> float | None:
    """Token-weighted loss over [start, end) from the report's buckets."""
    cells = [b for b in report["position_loss"]["buckets"] if b["start"] >= start and b["end"] <= end]
    tokens = sum(b["tokens"] for b in cells)
    return sum(b["loss"] * b["tokens"] for b in cells) / tokens if tokens else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="holds artifacts/ and runs/demo")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = [f"paths.artifacts={args.workdir / 'artifacts'}", f"paths.runs={args.workdir / 'runs'}"]
    if not (args.workdir / "runs" / "demo").is_dir():
        sys.exit(f"{args.workdir}/runs/demo is missing: run benchmarks/demo.py --keep {args.workdir} first")
    held_out = f"texts=['{Path(__import__('deepspeed').__file__).parent}/runtime/**/*.py']"
    wall = {}
    for name, overrides in VARIANTS.items():
        cmd = [sys.executable, "-m", "pretrain", "+experiment=demo_long", *paths, *overrides,
               "train.eval_long_context=false", "train.sample_tokens=0"]  # fmt: skip
        wall[name] = run(cmd)
        print(f"{name}: trained in {wall[name]:.0f} s", flush=True)
    reports = {}
    runs = {"demo": "demo", **{k: v[0].split("=")[1] for k, v in VARIANTS.items()}}
    for name, run_name in runs.items():
        out = args.workdir / "eval" / name
        cmd = [sys.executable, "-m", "pretrain.evaluate", str(args.workdir / "runs" / run_name), *EVAL,
               "max_seq_len=1024", f"eval_dir={out}", held_out]  # fmt: skip
        run(cmd)
        reports[name] = json.loads((out / "long_context.json").read_text())
    rows = {}
    for name, report in reports.items():
        copy = report.get("copy_probe", {}).get("distances", [])
        rows[name] = {
            "loss_128_256": bucket(report, 128, 256),
            "loss_512_1024": bucket(report, 512, 1024),
            "loss_by_bucket": {
                f"{b['start']}-{b['end']}": b["loss"] for b in report["position_loss"]["buckets"]
            },
            "copy_gain_by_distance": {
                d["distance"]: d["first_copy_loss"] - d["second_copy_loss"] for d in copy
            },
            "passkey_accuracy": report.get("passkey", {}).get("accuracy"),
            "train_wall_s": wall.get(name),
        }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "held_out_documents": reports["demo"]["position_loss"]["sequences"],
        "held_out_source": "deepspeed/runtime/**/*.py of this environment (DeepSpeed "
        + __import__("deepspeed").__version__
        + ")",
        "rows": rows,
    }
    for name, row in rows.items():
        print(f"{name:>12}: loss 128-255 {row['loss_128_256']:.3f}, 512-1023 {row['loss_512_1024']:.3f}, "
              f"passkey {row['passkey_accuracy']}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
