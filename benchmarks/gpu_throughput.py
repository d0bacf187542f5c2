"""Training throughput and MFU of our ZeRO-3 trainer, against Hugging Face Llama under the same DeepSpeed config.

    python benchmarks/gpu_throughput.py --experiment 1b --seq-len 4096 --micro-batch 1 --steps 20 --warmup 5 \
        --out results.json [--no-baseline] [--override k=v ...] [--sweep k=v1,v2 ...] [--compile]

Each case runs in fresh rank processes of its own (one per GPU, or `--ranks` gloo ranks on CPU, started like
pretrain/train/launch.py does), so memory, compiled kernels and allocator state never leak from one measurement into
the next. A rank (benchmarks/throughput_case.py) composes the config exactly as `python -m pretrain
+experiment=<name> <overrides>` would, builds `pretrain.train.engine.TrainingEngine` (ZeRO-3 model construction,
optimizer, DeepSpeed engine: the trainer's own code) and drives `TrainingEngine.backward` and `optimizer_step` with synthetic
token batches of the configured shape, `--grad-accum` micro-batches per optimizer step. Synthetic batches
isolate the model, ZeRO-3 and the optimizer from data loading, need no tokenizer or shards (nothing to prepare
on a GPU machine) and write no checkpoints; the loader's own cost is measured by benchmarks/data_pipeline.py.

`--documents N` splits every row into N equal documents, as packing does, so our model takes the trainer's
attention path (on CUDA, FlexAttention with a document-causal block mask; elsewhere SDPA with a boolean mask).
`--documents 0` passes no document ids, which makes our model use plain causal SDPA (flash on Hopper): the
"Flash SDPA" lever. `--compile` applies DeepSpeed's `engine.compile()` (torch.compile) to our model only.

After `--warmup` steps, `--steps` optimizer steps are timed one by one (device synchronized around each).
Figures: tokens/s = tokens of the timed steps / their total time; TFLOP/s per device = tokens/s x
`pretrain.model.transformer.flops_per_token` (6N + attention) / ranks; MFU = that / `pretrain.train.metrics.peak_tflops`
(989 dense BF16 for H100 SXM and H200; None on CPU); peak memory = the largest `memory_gib()` of any rank.
The baseline (benchmarks/hf_baseline.py) runs the same shape, DeepSpeed config and optimizer, once for each
distinct shape among the cases, and every case reports `ratio_vs_baseline` = its tokens/s over the baseline's.
`--out` is rewritten after every case, so a run cut short keeps what it measured; a failed case (out of memory,
timeout) is recorded with its error and log tail, the others still run, and the exit code is then 1. Every case
first asks the trainer's memory check (`pretrain.planning.memory_check`): one that cannot fit this machine is not started
and becomes a result row with `refused` (the planner's numbers), which is an answer, not a failure.
`mfu` counts attention over the full T x T square (PaLM's convention); `mfu_computed_attention` counts only the
causal pairs within each document, the work the kernels do.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput_case import compose_case_config, normalize_override, shape_of  # noqa: E402

CASE_SCRIPT = Path(__file__).resolve().parent / "throughput_case.py"
# What fixes the work of one step (benchmarks.throughput_case.shape_of); a baseline is run per distinct shape.
SHAPE_KEYS = ("seq_len", "micro_batch", "grad_accum", "world_size", "activation_checkpointing", "offload")


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
    """The cartesian product of `key=v1,v2` axes, as override lists ([[]] when there is no sweep)."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--sweep {sweep!r}: expected key=value1,value2,...")
        axes.append([normalize_override(f"{key}={v.strip()}") for v in values.split(",") if v.strip()])
    return [list(point) for point in itertools.product(*axes)]


# ------------------------------------------------------------------------------------------ orchestration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(spec: dict[str, Any], world: int, timeout_s: float, work: Path) -> dict[str, Any]:
    """Spawn `world` fresh ranks for one case and return rank 0's figures, or the error with its log tail."""
    import torch

    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec["name"])[:120]
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(
        missing_ok=True
    )  # a stale result in a reused --logs directory must not pass for this one
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        base.setdefault("DS_ACCELERATOR", "cpu")
        base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // world)))
    cmd = [sys.executable, str(CASE_SCRIPT), str(spec_path), str(result_path)]
    logs = [work / f"{tag}.rank{rank}.log" for rank in range(world)]
    procs = []
    for rank in range(world):
        with logs[rank].open("w") as out:
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    deadline, error = time.monotonic() + timeout_s, None
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            error = f"a rank exited with code {failed[0]}" if failed else f"timed out after {timeout_s:.0f} s"
            break
        time.sleep(0.2)
    for proc in procs:  # only our own children, by their handles
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    codes = [p.returncode for p in procs]
    if error is None and any(codes):
        error = f"ranks exited with codes {codes}"
    if error is None and not result_path.is_file():
        error = "rank 0 wrote no result"
    if error is not None:
        failing = next((i for i, c in enumerate(codes) if c), 0)
        tail = logs[failing].read_text(errors="replace")[-4000:]
        return {
            "name": spec["name"],
            "impl": spec["impl"],
            "overrides": spec["overrides"],
            "error": error,
            "log_tail": tail,
        }
    return json.loads(result_path.read_text())


def _output(*cmd: str) -> str | None:
    """stdout of a read-only command, or None when it is missing or fails."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Device, versions and commit: every figure is quoted with them.

    The GPU is named through nvidia-smi: this process must not create a CUDA context, which would hold device
    memory while the cases run.
    """
    import deepspeed
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    gpu = _output("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    status = _output("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "device": (gpu or "cuda") if cuda else f"cpu ({os.cpu_count()} cores)",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": _output("git", "rev-parse", "HEAD"),  # None where the tree was copied without .git
        "uncommitted_changes": bool(status) if status is not None else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plan_cases(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """Our cases (one per sweep point and repeat), each followed by a baseline when its shape is new."""
    flags = []
    if args.seq_len:
        flags.append(f"data.packing.seq_len={args.seq_len}")
    if args.micro_batch:
        flags.append(f"train.micro_batch_size={args.micro_batch}")
    common = {
        "experiment": args.experiment,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "warmup": args.warmup,
        "documents": args.documents,
        "compile": args.compile,
    }
    cases, shapes = [], []
    for point in sweep_overrides(args.sweep):
        overrides = [*flags, *args.override, *point]
        label = " ".join(point) or "base"
        cfg = compose_case_config(args.experiment, overrides, args.grad_accum, world)
        for repeat in range(args.repeat):
            suffix = f" #{repeat + 1}" if args.repeat > 1 else ""
            cases.append({**common, "impl": "ours", "name": f"ours {label}{suffix}", "overrides": overrides})
        shape = shape_of(cfg, args.grad_accum, world)
        if args.baseline and shape not in shapes:
            shapes.append(shape)
            name = "hf " + " ".join(f"{k}={shape[k]}" for k in SHAPE_KEYS[:3])
            # Stock Hugging Face: eager, one causal document per row (its SDPA path takes no document ids).
            hf = {"impl": "hf", "name": name, "overrides": overrides, "compile": False, "documents": 0}
            cases.append({**common, **hf})
    return cases


def unmeasured(result: dict[str, Any]) -> bool:
    """A case with no figures: it failed (`error`) or the memory check refused it (`refused`)."""
    return "error" in result or "refused" in result


def add_ratios(results: list[dict[str, Any]]) -> None:
    """`ratio_vs_baseline` for every case whose shape matches a measured baseline (None otherwise)."""
    baselines = [r for r in results if r["impl"] == "hf" and not unmeasured(r)]
    for result in results:
        if result["impl"] != "ours" or unmeasured(result):
            continue
        match = next((b for b in baselines if all(b[k] == result[k] for k in SHAPE_KEYS)), None)
        result["baseline"] = match["name"] if match else None
        result["ratio_vs_baseline"] = result["tokens_per_s"] / match["tokens_per_s"] if match else None


def print_table(results: list[dict[str, Any]], env: dict[str, Any]) -> None:
    print(
        f"\n{env['device']}; torch {env['torch']}, deepspeed {env['deepspeed']}, transformers {env['transformers']}"
    )
    print(f"{'case':<52}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs HF':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['name'][:51]:<52}  FAILED: {r['error']}")
            continue
        if "refused" in r:
            print(f"{r['name'][:51]:<52}  REFUSED: {r['refused']}")
            continue
        mem = r["memory_gib"].get("max_allocated_gib", r["memory_gib"].get("peak_rss_gib", 0.0))
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = f"{r['ratio_vs_baseline']:.2f}" if r.get("ratio_vs_baseline") else "-"
        print(
            f"{r['name'][:51]:<52}{r['tokens_per_s']:>11.1f}{r['tflops_per_device']:>9.3f}{mfu:>7}{mem:>10.2f}{ratio:>7}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="debug", help="conf/experiment/<name> ('' for the defaults)")
    p.add_argument("--seq-len", type=int, default=0, help="data.packing.seq_len (default: the experiment's)")
    p.add_argument(
        "--micro-batch", type=int, default=0, help="train.micro_batch_size (default: the experiment's)"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing starts")
    p.add_argument(
        "--documents", type=int, default=1, help="documents per row (0: no document ids, causal SDPA)"
    )
    p.add_argument(
        "--compile", action="store_true", help="DeepSpeed's engine.compile() on our model (torch.compile)"
    )
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one case per value")
    p.add_argument("--repeat", type=int, default=1, help="measure each of our cases this many times")
    p.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the Hugging Face baseline"
    )
    p.add_argument("--ranks", type=int, default=0, help="ranks per case (default: one per GPU, or 2 on CPU)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one case may take")
    p.add_argument("--out", type=Path, help="write the results here as JSON (rewritten after every case)")
    p.add_argument("--logs", type=Path, help="keep the rank logs in this directory")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.grad_accum < 1 or args.documents < 0 or args.repeat < 1:
        p.error("--steps and --grad-accum and --repeat must be >= 1, --warmup and --documents >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from data.log import setup_logging

    setup_logging("INFO")
    world = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    cases = plan_cases(args, world)
    report: dict[str, Any] = {"environment": environment(), "command": " ".join(sys.argv), "results": []}
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as tmp:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for number, spec in enumerate(cases, 1):
            print(f"[{number}/{len(cases)}] {spec['name']} on {world} rank(s)", file=sys.stderr, flush=True)
            report["results"].append(run_case(spec, world, args.timeout, work))
            add_ratios(report["results"])
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report["results"], report["environment"])
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
