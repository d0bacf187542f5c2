"""Peak memory per rank for one long sequence, without and with sequence parallelism, beside the planner's figure.

    python benchmarks/sequence_parallel_memory.py --out benchmarks/results/sequence_parallel_memory.json

Runs the real trainer (`python -m pretrain +experiment=debug ...`, 2 local ZeRO-3 ranks on CPU, 2 optimizer
steps of one micro-batch of 1 sequence per data-parallel rank) with a 3.3M-parameter model at `--seq-len` tokens:

* SP=1: each of the 2 ranks trains a whole sequence (data-parallel size 2);
* SP=2: the 2 ranks share one sequence, each holding half of it (data-parallel size 1), DeepSpeed-Ulysses;
* SP=2 with TiledMLP.

The model state is sharded over both ranks in every case, so the difference is the activations of the tokens
each rank holds. As in `benchmarks/plan_vs_measured.py` (whose measurement this reuses), the CPU figure is rank
0's peak RSS with glibc returning freed memory at once, minus the same trainer with a 0.1M-parameter model at the
same length and sequence-parallel size (interpreter, libraries, data loader, the whole-sequence mask and
attention workspace), and the prediction is `pretrain.planning.memory_model.zero3_memory` for the same composed
config minus its own baseline. The raw peaks are reported too. On CUDA the
figure is `torch.cuda.max_memory_allocated` and nothing is subtracted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.plan_vs_measured import (  # noqa: E402 - after the path set-up above
    GIB,
    LEAN_MALLOC,
    measured_peak_gib,
    on_cuda,
    predicted_bytes,
)

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=704"]
BASELINE = ["model.dim=64", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=176"]
CASES = {
    "SP=1": [],
    "SP=2": ["deepspeed.sequence_parallel_size=2"],
    "SP=2, TiledMLP": ["deepspeed.sequence_parallel_size=2", "deepspeed.tiled_mlp=true"],
}


def run_overrides(seq_len: int, artifacts: Path) -> list[str]:
    """One sequence per data-parallel rank and micro-batch, 2 optimizer steps, nothing else."""
    return [
        "+experiment=debug",
        f"paths.artifacts={artifacts}",
        f"data.packing.seq_len={seq_len}",
        f"model.max_seq_len={seq_len}",
        "train.micro_batch_size=1",
        "train.start_batch_tokens=0",
        "train.batch_ramp_tokens=0",
        "train.eval_every_steps=0",
        "train.checkpoint_every_steps=0",
        "train.sample_tokens=0",
        "logging.wandb_mode=disabled",
        "logging.log_every_steps=1",
        "deepspeed.precision=auto",
        "train.local_processes=2",
    ]


def batch_for(case: list[str], seq_len: int) -> list[str]:
    """The global batch: one sequence per data-parallel rank (2 at SP=1, 1 at SP=2), for 2 steps."""
    sequences = 1 if any("sequence_parallel_size=2" in o for o in case) else 2
    return [
        f"train.global_batch_tokens={sequences * seq_len}",
        f"train.total_tokens={2 * sequences * seq_len}",
    ]


def case_row(overrides: list[str], extra: list[str], seq_len: int, env: dict, work: Path, name: str) -> dict:
    """The planner's peak and the measured one of one trainer run."""
    overrides = [*overrides, *batch_for(extra, seq_len)]
    return {
        "overrides": extra,
        "predicted_gib": predicted_bytes(overrides, 2, "cuda" if on_cuda() else "cpu")["peak"] / GIB,
        "measured_gib": measured_peak_gib(overrides, env, work / "runs", name),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    from data.prepare import ensure_data
    from pretrain.config import compose_pretrain_config
    from pretrain.planning.hardware import resolve_precision

    device = "cuda" if on_cuda() else "cpu"
    env = {} if device == "cuda" else dict(LEAN_MALLOC)
    work = Path(tempfile.mkdtemp(prefix="sp_memory_"))
    try:
        common = run_overrides(args.seq_len, work / "artifacts")
        ensure_data(compose_pretrain_config([*common, *batch_for([], args.seq_len)]).data_pipeline())
        rows, baselines = {}, {}
        for i, (case, extra) in enumerate(CASES.items()):
            sp = extra[:1]  # the baseline runs at the same sequence-parallel size
            if tuple(sp) not in baselines:
                baselines[tuple(sp)] = case_row(
                    [*common, *BASELINE, *sp], sp, args.seq_len, env, work, f"base{i}"
                )
            rows[case] = case_row([*common, *MODEL, *extra], extra, args.seq_len, env, work, f"case{i}")
            base = baselines[tuple(sp)]
            rows[case]["baseline"] = base
            subtract = device == "cpu"
            rows[case]["measured_model_gib"] = rows[case]["measured_gib"] - subtract * base["measured_gib"]
            rows[case]["predicted_model_gib"] = rows[case]["predicted_gib"] - subtract * base["predicted_gib"]
            print(f"{case}: {rows[case]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    precision, why = resolve_precision("auto")
    result = {
        "device": device,
        "precision": f"{precision} ({why})",
        "seq_len": args.seq_len,
        "model": MODEL,
        "command": f"python benchmarks/sequence_parallel_memory.py --seq-len {args.seq_len}",
        "metric": "memory/max_allocated_gib"
        if device == "cuda"
        else "memory/peak_rss_gib (rank 0) - baseline",
        "cases": rows,
    }
    print(f"{device}, 2 ranks, {args.seq_len} tokens per sequence, {result['metric']}")
    print(f"{'case':<18}{'predicted':>11}{'measured':>11}{'rank 0 peak RSS':>17}")
    for case, row in rows.items():
        print(
            f"{case:<18}{row['predicted_model_gib']:>9.3f}Gi{row['measured_model_gib']:>9.3f}Gi"
            f"{row['measured_gib']:>15.3f}Gi"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
