"""Before the engine is built: does this run fit the memory of the machine it is about to run on?

A run that cannot fit otherwise grows until the out-of-memory killer ends it, minutes later and without a word
about why. The planner's memory model (`pretrain.planning.memory_model`, checked against measured peaks) already knows,
so each rank asks it first: on a GPU, the need per GPU against the device's memory and the offloaded state
against the host; on CPU ranks, every local rank's need against the host's available memory. When it does
not fit, the run stops with the numbers and the planner's suggestions; `train.check_memory=false` lets an
expert proceed anyway.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from pretrain.config import ConfigError, PretrainConfig
from pretrain.planning.hardware import available_memory_gib, resolve_precision
from pretrain.planning.memory_model import ParamInventory, Strategy, zero3_memory
from pretrain.planning.plan import GIB, ClusterConfig, PlanConfig, build_plan

# Resident memory of one CPU rank besides the model: the interpreter, torch, DeepSpeed, gloo, the data index.
CPU_RANK_BASE_GIB = 0.6


def ensure_fits(cfg: PretrainConfig, world: int, local_ranks: int) -> None:
    """Stop with the planner's numbers when the run cannot fit this machine (unless train.check_memory=false)."""
    if not cfg.train.check_memory:
        return
    precision, _ = resolve_precision(cfg.deepspeed.precision)
    problem = memory_problem(cfg, world, local_ranks, precision)
    if problem:
        raise ConfigError(f"train.check_memory: this run does not fit this machine: {problem}")


def memory_problem(cfg: PretrainConfig, world: int, local_ranks: int, precision: str) -> str | None:
    """None when the run fits; otherwise what it needs, what the machine has, and what to change."""
    if torch.cuda.is_available():
        return _gpu_problem(cfg, world, local_ranks, precision)
    inventory = ParamInventory.of(cfg.model, cfg.optim)
    est = zero3_memory(
        inventory,
        cfg.model,
        cfg.deepspeed,
        world,
        cfg.train.micro_batch_size,
        cfg.data.packing.seq_len,
        Strategy.of(cfg.deepspeed),
        "cpu",
        precision,
    )
    per_rank = (est.gpu_peak + est.cpu_total) / GIB + CPU_RANK_BASE_GIB
    need, have = local_ranks * per_rank, available_memory_gib("cpu")
    if need <= have:
        return None
    return (
        f"model {cfg.model.name} ({inventory.total / 1e9:.2f}B parameters, {precision}) needs about "
        f"{per_rank:.1f} GiB per CPU rank under ZeRO-{cfg.deepspeed.zero_stage} over {world} ranks, "
        f"{need:.1f} GiB for the {local_ranks} ranks of this machine, which has {have:.1f} GiB available. "
        "Use a smaller model, more machines (ranks), a smaller train.micro_batch_size, or set "
        "train.check_memory=false to try anyway"
    )


def _gpu_problem(cfg: PretrainConfig, world: int, local_ranks: int, precision: str) -> str | None:
    # The planner sizes what the run will really use: `auto` resolved (fp32 on a GPU without bf16).
    cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, precision=precision))
    device = torch.cuda.get_device_properties(torch.cuda.current_device())
    cluster = ClusterConfig(
        nodes=max(1, world // local_ranks),
        gpus_per_node=local_ranks,
        gpu=device.name,
        gpu_memory_gib=device.total_memory / GIB,
        peak_tflops=1.0,  # not used by the memory check
        cpu_memory_gib=available_memory_gib("cpu"),
    )
    plan_cfg = PlanConfig(**{f.name: getattr(cfg, f.name) for f in fields(PretrainConfig)}, cluster=cluster)
    plan = build_plan(plan_cfg)
    if plan["fits"]:
        return None
    chosen = plan["memory"][0]
    lines = [
        f"{chosen['strategy']} needs {chosen['gpu_need_gib']:.1f} GiB per GPU ({device.name}: "
        f"{cluster.gpu_memory_gib:.1f} GiB) and {chosen['cpu_per_node_gib']:.0f} GiB of host memory per node "
        f"({cluster.cpu_memory_gib:.0f} GiB available)",
        *(f"to make it fit: {s}" for s in plan["suggestions"]),
        "or set train.check_memory=false to try anyway",
    ]
    return "; ".join(lines)
