"""The planner's predicted peak memory per rank against the peak the real trainer reaches.

    python benchmarks/plan_vs_measured.py --out benchmarks/results/plan_vs_measured.json

Runs `python -m pretrain +experiment=debug ...` (2 local ZeRO-3 ranks on CPU, one per GPU on CUDA) with a ~24M
parameter model (`deepspeed.precision=auto`: bf16 on a GPU or a CPU with native bf16, fp32 elsewhere; seq_len 256,
micro-batch 4, 5 optimizer steps of 2 micro-batches), once with activation
checkpointing and once without, reads the peak memory the trainer logs in runs/<name>/metrics.jsonl, and
compares it with `pretrain.planning.memory_model.zero3_memory` for the same composed config.

What is measured, and why it is comparable:

* CUDA: `memory/max_allocated_gib` (torch.cuda.max_memory_allocated) counts tensors only, which is what the
  planner predicts (before its allocator headroom and CUDA context), so the two are compared directly.
* CPU: the trainer logs `memory/peak_rss_gib`, the peak resident set of rank 0, which also holds the Python
  interpreter, torch, DeepSpeed (its JIT-built communication op), the tokenizer, the data loader and the
  tracker. That baseline is measured by the same trainer command with a ~0.1M parameter model (same data,
  sequence length and batch, so the same code runs) and subtracted from both the measured and the predicted
  peaks: what remains is the memory the model's size causes. An empty process that only imported torch and
  DeepSpeed and joined the process group is also measured and reported, to show how much the trainer adds on
  top of it (subtracting that smaller baseline instead would credit the tokenizer and loader to the model).
  glibc is told to hand freed blocks back to the kernel at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)
  so that RSS follows live tensors the way max_memory_allocated does, rather than the high-water mark of a heap
  glibc keeps; `--default-malloc` runs without that, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
SHAPE = ["data.packing.seq_len=256", "model.max_seq_len=256", "train.micro_batch_size=4"]
RUN = [
    "train.global_batch_tokens=4096",  # x ranks: 2 micro-batches per step on 2 CPU ranks
    "train.start_batch_tokens=0",
    "train.batch_ramp_tokens=0",
    "train.total_tokens=20480",
    "train.eval_every_steps=0",
    "train.checkpoint_every_steps=0",
    "train.sample_tokens=0",
    "logging.wandb_mode=disabled",
    "logging.log_every_steps=1",
    "deepspeed.precision=auto",  # the debug experiment pins fp32; measure what a user's run would use
]
MODEL_24M = [
    "model.dim=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_dim=1408",
]
MODEL_BASELINE = [
    "model.dim=64",
    "model.n_layers=1",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=176",
]
CASES = {
    "baseline (0.1M params)": MODEL_BASELINE,
    "24M, checkpointing": [*MODEL_24M, "deepspeed.activation_checkpointing=true"],
    "24M, no checkpointing": [*MODEL_24M, "deepspeed.activation_checkpointing=false"],
}
LEAN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

EMPTY_RANK = """
import os, resource, sys, torch, deepspeed, torch.distributed as dist
from pretrain.train.engine import shutdown
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
dist.barrier()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
shutdown()
"""


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def ranks() -> int:
    from pretrain.train.launch import default_local_processes

    return default_local_processes(0)


def predicted_bytes(overrides: list[str], world: int, device: str) -> dict[str, Any]:
    from pretrain.config import compose_pretrain_config
    from pretrain.planning.hardware import resolve_precision
    from pretrain.planning.memory_model import ParamInventory, Strategy, zero3_memory

    cfg = compose_pretrain_config(overrides)
    inventory = ParamInventory.of(cfg.model, cfg.optim)
    est = zero3_memory(
        inventory,
        cfg.model,
        cfg.deepspeed,
        world,
        cfg.train.micro_batch_size,
        cfg.data.packing.seq_len,
        Strategy.of(cfg.deepspeed),
        device,
        precision=resolve_precision(cfg.deepspeed.precision)[0],  # the precision the trainer will train in
    )
    return {"peak": est.gpu_peak, "phase": est.peak_phase, "parameters": inventory.total}


def measured_peak_gib(overrides: list[str], env: dict[str, str], runs: Path, name: str) -> float:
    """Run the trainer as a user would and take the largest peak it logged."""
    cmd = [sys.executable, "-m", "pretrain", *overrides, f"paths.runs={runs}", f"train.run_name={name}"]
    full_env = {k: v for k, v in {**os.environ, **env}.items() if k != "RANK"}
    result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    key = "memory/max_allocated_gib" if on_cuda() else "memory/peak_rss_gib"
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)[key] for line in lines if key in line)


def empty_rank_peak_gib(env: dict[str, str]) -> float:
    """Peak RSS of a rank that imported torch + DeepSpeed and joined a 2-rank gloo group, nothing else."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EMPTY_RANK],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "DS_ACCELERATOR": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return int(outputs[0].split()[-1]) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default heap behaviour")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary artifacts and run directories"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plan_vs_measured_"))
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:

    from data.prepare import ensure_data
    from pretrain.config import compose_pretrain_config

    device = "cuda" if on_cuda() else "cpu"
    world = ranks()
    env = {} if args.default_malloc or device == "cuda" else dict(LEAN_MALLOC)
    artifacts = work / "artifacts"
    common = ["+experiment=debug", f"paths.artifacts={artifacts}", *SHAPE, *RUN]
    if device == "cpu":
        common.append(f"train.local_processes={world}")
    ensure_data(compose_pretrain_config(common).data_pipeline())

    rows = {}
    for i, (case, extra) in enumerate(CASES.items()):
        overrides = [*common, *extra]
        prediction = predicted_bytes(overrides, world, device)
        rows[case] = {
            "overrides": extra,
            "parameters": prediction["parameters"],
            "predicted_gib": prediction["peak"] / GIB,
            "predicted_peak_phase": prediction["phase"],
            "measured_gib": measured_peak_gib(overrides, env, work / "runs", f"case{i}"),
        }
    baseline = rows.pop("baseline (0.1M params)")
    for row in rows.values():
        if device == "cpu":  # RSS: compare what the model adds over the same trainer with a negligible model
            row["measured_model_gib"] = row["measured_gib"] - baseline["measured_gib"]
            row["predicted_model_gib"] = row["predicted_gib"] - baseline["predicted_gib"]
        else:  # max_memory_allocated already counts tensors only
            row["measured_model_gib"], row["predicted_model_gib"] = row["measured_gib"], row["predicted_gib"]
        row["ratio_measured_over_predicted"] = row["measured_model_gib"] / row["predicted_model_gib"]

    from pretrain.planning.hardware import resolve_precision

    precision, why = resolve_precision("auto")
    result = {
        "device": device,
        "precision": f"{precision} ({why})",
        "ranks": world,
        "metric": "memory/max_allocated_gib" if device == "cuda" else "memory/peak_rss_gib (rank 0)",
        "malloc_env": env,
        "command": " ".join(["python -m pretrain", *common, *CASES["24M, checkpointing"]]).replace(
            str(work), "<tmp>"
        ),
        "baseline_trainer_gib": baseline["measured_gib"],
        "baseline_predicted_gib": baseline["predicted_gib"],
        "cases": rows,
    }
    if device == "cpu":
        result["empty_rank_gib"] = empty_rank_peak_gib(env)

    print(f"{device}, {world} ranks, metric {result['metric']}")
    if device == "cpu":
        print(
            f"baseline: trainer with a 0.1M model {baseline['measured_gib']:.3f} GiB per rank "
            f"(an empty rank with torch + DeepSpeed + process group: {result['empty_rank_gib']:.3f} GiB)"
        )
    print(f"{'case':<26}{'predicted':>11}{'measured':>11}{'ratio':>8}  peak phase (predicted)")
    for case, row in rows.items():
        print(
            f"{case:<26}{row['predicted_model_gib']:>9.3f}Gi{row['measured_model_gib']:>9.3f}Gi"
            f"{row['ratio_measured_over_predicted']:>8.3f}  {row['predicted_peak_phase']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
