"""One case of benchmarks/gpu_throughput.py, inside one rank: build the engine, time optimizer steps, report.

    python benchmarks/throughput_case.py SPEC.json RESULT.json     # started by gpu_throughput.py, one per rank

The rank composes the config as `python -m pretrain +experiment=<name> <overrides>` would, with a global batch
of exactly `grad_accum` micro-batches, builds our `pretrain.train.engine.TrainingEngine` (or the Hugging Face baseline
of benchmarks/hf_baseline.py) and times `warmup + steps` optimizer steps over synthetic batches that already
sit on the device, synchronizing the device around each step. Rank 0 writes the figures as JSON.

Before building anything the case asks the trainer's memory check (`pretrain.planning.memory_check`, the planner's memory
model against this machine's GPU and host memory). A case that cannot fit is not started: rank 0 writes a result
row with `refused` (the check's numbers and suggestions) instead of letting the out-of-memory killer end it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_SCIENTIFIC_INT = re.compile(r"^[+-]?\d+(\.\d+)?[eE]\+?\d+$")


def normalize_override(override: str) -> str:
    """`key=1e8` -> `key=100000000`: Hydra reads scientific notation as a float, which an int field rejects."""
    key, sep, value = override.partition("=")
    if sep and _SCIENTIFIC_INT.match(value) and float(value).is_integer():
        return f"{key}={int(float(value))}"
    return override


def compose_case_config(experiment: str, overrides: list[str], grad_accum: int, world_size: int) -> Any:
    """The trainer's composed config for one case, with a global batch of exactly `grad_accum` micro-batches."""
    from pretrain.config import compose_pretrain_config

    base = [f"+experiment={experiment}"] if experiment else []
    base += [normalize_override(o) for o in overrides]
    first = compose_pretrain_config(base)
    seq_len, micro = first.data.packing.seq_len, first.train.micro_batch_size
    fixed = [
        f"train.global_batch_tokens={seq_len * micro * world_size * grad_accum}",
        "train.start_batch_tokens=0",
        "train.batch_ramp_tokens=0",
        "logging.wandb_mode=disabled",
    ]
    if first.model.max_seq_len < seq_len:  # the model has no length-bound buffers; the limit is only a check
        fixed.append(f"model.max_seq_len={seq_len}")
    return compose_pretrain_config([*base, *fixed])


def shape_of(cfg: Any, grad_accum: int, world_size: int) -> dict[str, Any]:
    """What fixes the work of one optimizer step: a baseline must match all of it for a ratio to mean anything."""
    ds = cfg.deepspeed
    return {
        "seq_len": cfg.data.packing.seq_len,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accum": grad_accum,
        "world_size": world_size,
        "activation_checkpointing": ds.activation_checkpointing,
        "offload": f"optimizer={ds.offload_optimizer},param={ds.offload_param}",
    }


def throughput_figures(
    step_times: list[float],
    tokens_per_step: int,
    flops_per_token: float,
    world_size: int,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """Tokens/s, model FLOPs, TFLOP/s per device and MFU over the timed steps (MFU None without a peak)."""
    if not step_times:
        raise ValueError("no timed steps: pass --steps >= 1")
    total_s = sum(step_times)
    tokens = tokens_per_step * len(step_times)
    tokens_per_s = tokens / total_s
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return {
        "timed_tokens": tokens,
        "timed_seconds": total_s,
        "median_step_s": statistics.median(step_times),
        "min_step_s": min(step_times),
        "max_step_s": max(step_times),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world_size,
        "model_flops": flops_per_token * tokens,
        "tflops_per_device": tflops,
        "peak_tflops": peak_tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }


def synthetic_batch(
    vocab_size: int, micro: int, seq_len: int, documents: int, seed: int, device: Any = "cpu"
) -> dict[str, Any]:
    """A packed-looking micro-batch: random tokens, `documents` equal documents per row (0: no document ids)."""
    import torch

    from pretrain.model.rope import positions_from_documents

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (micro, seq_len), generator=gen)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if documents > 0:
        document_ids = (torch.arange(seq_len) * documents // seq_len).expand(micro, seq_len).contiguous()
        batch["document_ids"] = document_ids
        batch["position_ids"] = positions_from_documents(document_ids)
    else:
        batch["position_ids"] = torch.arange(seq_len).expand(micro, seq_len).contiguous()
    return {key: value.to(device) for key, value in batch.items()}


def document_lengths(seq_len: int, documents: int) -> list[int]:
    """The lengths of the `documents` documents `synthetic_batch` puts in a row of `seq_len` tokens."""
    starts = [-(-i * seq_len // documents) for i in range(documents)] + [seq_len]
    return [b - a for a, b in itertools.pairwise(starts) if b > a]


def attention_path(cfg: Any, impl: str, documents: int, cuda: bool) -> str:
    """Which attention kernel family the case ran, as pretrain.model.transformer chooses it."""
    if impl == "hf":
        return "transformers sdpa, causal"
    if documents == 0:
        return "sdpa is_causal" + (" (flash)" if cuda else "")
    from pretrain.model.transformer import flex_attention

    auto_flex = cfg.model.attention == "auto" and cuda
    if flex_attention is not None and (cfg.model.attention == "flex" or auto_flex):
        return "flex, document-causal block mask"
    if documents == 1:  # one document per row needs no mask (pretrain.model.transformer.attention_mask)
        return "sdpa is_causal, one document per row"
    return "sdpa, boolean document mask"


def memory_refusal(cfg: Any, world: int, local_ranks: int) -> str | None:
    """Why this case would not fit this machine (the trainer's own check), or None when it fits or the
    config turns the check off (train.check_memory=false)."""
    if not cfg.train.check_memory:
        return None
    from pretrain.planning.hardware import resolve_precision
    from pretrain.planning.memory_check import memory_problem

    precision, _ = resolve_precision(cfg.deepspeed.precision)
    return memory_problem(cfg, world, local_ranks, precision)


def write_refusal(spec: dict[str, Any], cfg: Any, world: int, problem: str, result_path: Path) -> None:
    """Rank 0: the result row of a case the memory check refused; it has no figures, only the reason."""
    result = {
        **{k: spec[k] for k in ("name", "impl", "experiment", "overrides", "documents", "compile")},
        **shape_of(cfg, spec["grad_accum"], world),
        "refused": f"memory check: {problem}",
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")


def build_engine(spec: dict[str, Any], cfg: Any, env: Any) -> tuple[Any, int, dict[str, Any]]:
    """(engine, parameter count, extra result fields) for our trainer or the Hugging Face baseline."""
    from pretrain.batching import batch_layout
    from pretrain.train import engine as eng

    layout = batch_layout(
        cfg.train.global_batch_tokens,
        cfg.data.packing.seq_len,
        cfg.train.micro_batch_size,
        env.world_size,
        "train.global_batch_tokens",
    )
    if spec["impl"] == "ours":
        engine = eng.TrainingEngine(cfg, env, layout)
        return engine, engine.local_parameter_count()[1], {"precision": engine.precision}
    from benchmarks.hf_baseline import HFEngine

    engine = HFEngine(cfg, env, layout)
    extra = {"attn_implementation": engine.attn_implementation, "precision": engine.precision}
    return engine, engine.parameter_count(), extra


def step_function(engine: Any, batches: list[dict[str, Any]], causal_only: bool, world_size: int):
    """One optimizer step over the micro-batches; `causal_only` calls our model without document ids."""

    # Every rank holds the same synthetic micro-batches, so the global target count is the local one x ranks.
    targets = sum(int((b["labels"] != -100).sum()) for b in batches) * world_size

    # Without document ids our model runs plain causal attention (the engine passes what the batch holds).
    micro_batches = (
        [{k: v for k, v in b.items() if k != "document_ids"} for b in batches] if causal_only else batches
    )

    def step():
        for i, b in enumerate(micro_batches):
            loss = engine.backward(b, last=i == len(micro_batches) - 1, global_targets=targets)
        engine.optimizer_step()
        return loss

    return step


def run_case(spec: dict[str, Any], result_path: Path) -> None:
    """This rank's part of one case; rank 0 writes the figures to `result_path`."""
    import torch
    import torch.distributed as dist

    from data.log import get_logger
    from pretrain.train import collectives
    from pretrain.train import engine as eng
    from pretrain.train.metrics import memory_gib

    log = get_logger("benchmarks.throughput_case")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = compose_case_config(spec["experiment"], spec["overrides"], spec["grad_accum"], world)
    env = eng.init_distributed(cfg.deepspeed.timeout_minutes)
    cuda = torch.cuda.is_available()
    clean = False
    try:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # Rank 0 decides for all, so ranks reading slightly different free memory still agree.
        problem = collectives.broadcast_object(
            memory_refusal(cfg, world, local_ranks) if env.is_main else None
        )
        if problem:
            if env.is_main:
                log.warning("%s refused: %s", spec["name"], problem)
                write_refusal(spec, cfg, world, problem, result_path)
            clean = True
            return
        torch.manual_seed(cfg.train.seed)
        engine, parameters, extra = build_engine(spec, cfg, env)
        if engine.accumulation_steps != spec["grad_accum"]:
            raise RuntimeError(f"DeepSpeed accumulates {engine.accumulation_steps} micro-batches")
        engine.set_lr(cfg.optim.lr)
        if spec["compile"]:
            engine.compile()
        seq_len, micro = cfg.data.packing.seq_len, cfg.train.micro_batch_size
        seeds = [cfg.train.seed * 1000 + env.rank * 100 + i for i in range(spec["grad_accum"])]
        vocab, documents = cfg.model.vocab_size, spec["documents"]
        batches = [synthetic_batch(vocab, micro, seq_len, documents, s, engine.device) for s in seeds]
        step = step_function(
            engine, batches, spec["impl"] == "ours" and spec["documents"] == 0, env.world_size
        )
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        times, losses = [], []
        for index in range(spec["warmup"] + spec["steps"]):
            sync()
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
            if env.is_main:
                log.info("%s step %d: %.3f s, loss %.4f", spec["name"], index + 1, times[-1], losses[-1])
        memory = [memory_gib()] * world
        if dist.is_initialized():
            dist.all_gather_object(memory, memory_gib())
        if env.is_main:
            write_result(spec, cfg, env, extra, parameters, times, losses, memory, result_path)
        clean = True
    finally:
        eng.shutdown(clean=clean)


def write_result(
    spec: dict[str, Any],
    cfg: Any,
    env: Any,
    extra: dict[str, Any],
    parameters: int,
    times: list[float],
    losses: list[float],
    memory: list[dict[str, float]],
    result_path: Path,
) -> None:
    """Rank 0: the case's figures, with the timed steps split from the warm-up ones, as JSON."""
    import torch

    from pretrain.model.flops import ModelFlops, flops_per_token
    from pretrain.planning.hardware import peak_tflops

    cuda = torch.cuda.is_available()
    seq_len = cfg.data.packing.seq_len
    fpt = flops_per_token(cfg.model, seq_len)
    timed = times[spec["warmup"] :]
    peak = peak_tflops(cfg.logging.peak_tflops)
    # The attention pairs really computed: each row's documents (equal parts, see synthetic_batch) over 2.
    documents = max(1, spec["documents"]) if spec["impl"] == "ours" else 1
    row_pairs = sum(n * n for n in document_lengths(seq_len, documents)) / 2
    computed_fpt = ModelFlops.of(cfg.model, seq_len).computed(seq_len, row_pairs) / seq_len
    figures = throughput_figures(timed, cfg.train.global_batch_tokens, fpt, env.world_size, peak)
    computed = throughput_figures(timed, cfg.train.global_batch_tokens, computed_fpt, env.world_size, peak)
    result = {
        **{k: spec[k] for k in ("name", "impl", "experiment", "overrides", "documents", "compile")},
        **shape_of(cfg, spec["grad_accum"], env.world_size),
        **extra,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "attention": attention_path(cfg, spec["impl"], spec["documents"], cuda),
        "zero_stage": cfg.deepspeed.zero_stage,
        "parameters": parameters,
        "flops_per_token": fpt,
        "flops_convention": "6N + attention over the full T x T square (PaLM); *_computed_attention: causal "
        "pairs per document only",
        "flops_per_token_computed_attention": computed_fpt,
        "tokens_per_step": cfg.train.global_batch_tokens,
        "warmup": spec["warmup"],
        "steps": spec["steps"],
        "warmup_step_times_s": times[: spec["warmup"]],
        "step_times_s": timed,
        **figures,
        "tflops_per_device_computed_attention": computed["tflops_per_device"],
        "mfu_computed_attention": computed["mfu"],
        "memory_gib": {key.split("/")[-1]: max(m[key] for m in memory) for key in memory[0]},
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: throughput_case.py SPEC.json RESULT.json (started by benchmarks/gpu_throughput.py)")
    run_case(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
