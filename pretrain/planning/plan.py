"""`python -m pretrain.plan +experiment=7b [cluster.nodes=N cluster.gpus_per_node=G cluster.gpu=h100]`.

Before launching a run: its exact parameter count, FLOPs per token and for the whole run, the wall-clock time at
a given MFU on the cluster, and the memory each GPU (and each node's host) needs under ZeRO-3 for the configured
strategy and its alternatives (activation checkpointing, optimizer and parameter offload), with a warning and
concrete overrides when it does not fit. The memory model itself is `pretrain.planning.memory_model`.

The config is the trainer's (`conf/plan.yaml` composes `conf/config.yaml`, so every group and experiment works
the same) plus `cluster` and `plan` (output: `plan.format=json` prints JSON, `plan.json_out=path` writes it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.cli import CONF_DIR, compose_conf, to_config
from pretrain.batching import schedule_layouts
from pretrain.config import ConfigError, PretrainConfig, register_configs, typed_pretrain_config
from pretrain.model.flops import count_active_parameters, count_parameters, flops_per_token
from pretrain.planning.hardware import PEAK_BF16_TFLOPS
from pretrain.planning.memory_model import GIB, MemoryEstimate, ParamInventory, Strategy, zero3_memory
from pretrain.planning.plan_table import render_table
from pretrain.schedule import count_steps

# Device memory outside what torch.cuda.max_memory_allocated counts (CUDA context, NCCL buffers, cuBLAS and
# kernel workspaces), and the caching allocator's fragmentation on top of what it counts.
CUDA_RESERVED_GIB = 1.5
ALLOCATOR_HEADROOM = 0.10
# Host memory of one rank besides offloaded state: Python, torch, CUDA host libraries, DeepSpeed, data loader.
HOST_PER_RANK_GIB = 4.0


@dataclass(frozen=True)
class GpuSpec:
    peak_key: str  # key of pretrain.train.metrics.PEAK_BF16_TFLOPS
    memory_gib: float  # total device memory as nvidia-smi reports it


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100", 79.6),
    "h100-pcie": GpuSpec("H100 PCIe", 79.6),
    "h200": GpuSpec("H200", 140.4),
    "a100": GpuSpec("A100", 80.0),
    "a100-40gb": GpuSpec("A100", 40.0),
    "l40s": GpuSpec("L40S", 45.0),
    "mi300x": GpuSpec("MI300X", 192.0),
}


@dataclass
class ClusterConfig:
    """The machines to plan for; `gpu` names a row of `GPUS` (overridable for anything else)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100"
    # Model FLOPs utilisation assumed for the time estimate.
    mfu: float = 0.4
    # 0 = from the GPU table; set both for a GPU that is not in it.
    gpu_memory_gib: float = 0.0
    peak_tflops: float = 0.0
    # Host memory per node, checked against what offload needs (0 = not checked).
    cpu_memory_gib: float = 0.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self, key: str = "cluster") -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"{key}.mfu: must be in (0, 1], got {self.mfu}")
        if self.gpu not in GPUS and (self.gpu_memory_gib <= 0 or self.peak_tflops <= 0):
            raise ConfigError(
                f"{key}.gpu: unknown GPU {self.gpu!r}; use one of {sorted(GPUS)} or set "
                f"{key}.gpu_memory_gib and {key}.peak_tflops"
            )

    @property
    def memory_gib(self) -> float:
        return self.gpu_memory_gib or GPUS[self.gpu].memory_gib

    @property
    def peak(self) -> float:
        return self.peak_tflops or PEAK_BF16_TFLOPS[GPUS[self.gpu].peak_key]


@dataclass
class PlanOutputConfig:
    """`format`: table (readable) or json on stdout; `json_out`: also write the JSON to this file."""

    format: str = "table"
    json_out: str | None = None

    def validate(self, key: str = "plan") -> None:
        if self.format not in ("table", "json"):
            raise ConfigError(f"{key}.format: must be 'table' or 'json', got {self.format!r}")


@dataclass
class PlanConfig(PretrainConfig):
    """The primary config of `python -m pretrain.plan`: a trainer config plus the cluster and the output."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanOutputConfig = field(default_factory=PlanOutputConfig)

    def validate(self) -> None:
        super().validate()
        self.cluster.validate("cluster")
        self.plan.validate("plan")


def register_plan_configs() -> None:
    """Store `_plan_schema`: PlanConfig with every trainer key left missing.

    conf/plan.yaml lists it after `config`, so the merge adds the `cluster` and `plan` keys and the type, while
    missing values keep what conf/config.yaml and its groups composed (a plain PlanConfig would reset them).
    """
    register_configs()
    node = OmegaConf.structured(PlanConfig)
    for f in fields(PretrainConfig):
        node[f.name] = MISSING
    ConfigStore.instance().store(name="_plan_schema", node=node)


register_plan_configs()


def compose_plan_config(overrides: list[str] | None = None) -> PlanConfig:
    """`conf/plan.yaml` with overrides, outside `@hydra.main` (tests, benchmarks)."""
    return to_config(compose_conf("plan", overrides), PlanConfig)


@dataclass
class Variant:
    """One strategy's memory, and whether it fits the cluster's GPUs and hosts."""

    estimate: MemoryEstimate
    gpu_need_gib: float
    cpu_per_node_gib: float
    fits_gpu: bool
    fits_cpu: bool

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu


def gpu_need_gib(allocated: int) -> float:
    """Device memory a run needs when torch allocates `allocated` bytes at its peak."""
    return allocated / GIB * (1 + ALLOCATOR_HEADROOM) + CUDA_RESERVED_GIB


def evaluate(
    cfg: PlanConfig, inventory: ParamInventory, strategy: Strategy, world: int, micro_batch: int
) -> Variant:
    """Memory of `strategy` on `world` GPUs of the cluster's kind, and whether GPUs and hosts hold it."""
    precision = "fp32" if cfg.deepspeed.precision == "fp32" else "bf16"  # "auto" is bf16 on a GPU
    est = zero3_memory(
        inventory,
        cfg.model,
        cfg.deepspeed,
        world,
        micro_batch,
        cfg.data.packing.seq_len,
        strategy,
        "cuda",
        precision,
    )
    need = gpu_need_gib(est.gpu_peak)
    ranks = min(cfg.cluster.gpus_per_node, world)
    cpu_node = ranks * (est.cpu_total / GIB + HOST_PER_RANK_GIB)
    host = cfg.cluster.cpu_memory_gib
    return Variant(est, need, cpu_node, need <= cfg.cluster.memory_gib, host <= 0 or cpu_node <= host)


STRATEGIES = (
    Strategy(checkpointing=True),
    Strategy(checkpointing=False),
    Strategy(offload_optimizer=True, checkpointing=True),
    Strategy(offload_optimizer=True, checkpointing=False),
    Strategy(offload_optimizer=True, offload_param=True, checkpointing=True),
)


_STRATEGY_KEYS = {
    "deepspeed.activation_checkpointing": lambda s: str(s.checkpointing).lower(),
    "deepspeed.offload_optimizer": lambda s: "cpu" if s.offload_optimizer else "none",
    "deepspeed.offload_param": lambda s: "cpu" if s.offload_param else "none",
}


def overrides_for(strategy: Strategy, current: Strategy | None = None) -> str:
    """The command-line overrides that select `strategy` (those that differ from `current`, if given)."""
    return " ".join(
        f"{key}={value(strategy)}"
        for key, value in _STRATEGY_KEYS.items()
        if current is None or value(current) != value(strategy)
    )


def build_plan(cfg: PlanConfig) -> dict[str, Any]:
    """Everything the planner reports, as plain data (the JSON output)."""
    cluster, model, train = cfg.cluster, cfg.model, cfg.train
    seq_len, world = cfg.data.packing.seq_len, cluster.world_size
    params, active = count_parameters(model), count_active_parameters(model)
    inventory = ParamInventory.of(model, cfg.optim)
    per_token = flops_per_token(model, seq_len)
    total_flops = per_token * train.total_tokens
    cluster_flops = world * cluster.peak * 1e12 * cluster.mfu
    seconds = total_flops / cluster_flops
    batch = cfg.batch_schedule()

    warnings: list[str] = []
    try:
        schedule_layouts(batch.sizes(), seq_len, train.micro_batch_size, world)
    except ConfigError as err:
        warnings.append(f"batch on {world} GPUs: {err}")
    if cfg.deepspeed.expert_parallel_size:
        warnings.append(
            f"deepspeed.expert_parallel_size={cfg.deepspeed.expert_parallel_size} is not modelled: the memory "
            "figures are plain ZeRO-3's (every expert sharded over all ranks, a layer's experts gathered whole), "
            "not expert parallelism's (E/N experts held whole per rank, tokens moved by all-to-all)"
        )
    configured = Strategy.of(cfg.deepspeed)
    strategies = [configured, *(s for s in STRATEGIES if s != configured)]
    variants = [evaluate(cfg, inventory, s, world, train.micro_batch_size) for s in strategies]
    chosen = variants[0]
    suggestions = []
    if not chosen.fits:
        warnings.append(
            f"does not fit: {chosen.estimate.strategy.label} needs {chosen.gpu_need_gib:.1f} GiB per GPU "
            f"({cluster.gpu}: {cluster.memory_gib:.1f} GiB)"
            + ("" if chosen.fits_cpu else f" and {chosen.cpu_per_node_gib:.0f} GiB of host memory per node")
        )
        suggestions = _suggestions(cfg, inventory, variants)
    return {
        "model": {
            "name": model.name,
            "parameters": params,
            "active_parameters": active,
            "non_embedding_parameters": params - model.vocab_size * model.dim,
            "flops_per_token": per_token,
            "seq_len": seq_len,
            "sliding_window": model.sliding_window,
        },
        "compute": {
            "total_tokens": train.total_tokens,
            "total_flops": total_flops,
            "six_pc_flops": 6.0 * active * train.total_tokens,
            "optimizer_steps": count_steps(batch, train.total_tokens),
            "final_step_seconds": train.global_batch_tokens * per_token / cluster_flops,
            "tokens_per_second": cluster_flops / per_token,
            "seconds": seconds,
            "days": seconds / 86400,
            "gpu_hours": seconds * world / 3600,
        },
        "cluster": {
            **asdict(cluster),
            "world_size": world,
            "peak_tflops": cluster.peak,
            "gpu_memory_gib": cluster.memory_gib,
            "micro_batch_size": train.micro_batch_size,
            "grad_accumulation_final": train.global_batch_tokens
            // max(1, seq_len * train.micro_batch_size * world),
        },
        "memory": [_variant_dict(v, configured=i == 0) for i, v in enumerate(variants)],
        "zero_stage": cfg.deepspeed.zero_stage,
        "host_per_rank_gib": HOST_PER_RANK_GIB,
        "fits": chosen.fits,
        "warnings": warnings,
        "suggestions": suggestions,
        "scaling": scaling(cfg, inventory, strategies),
    }


MAX_GPUS = 4096


def scaling(cfg: PlanConfig, inventory: ParamInventory, strategies: list[Strategy]) -> dict[str, Any]:
    """How many GPUs of the cluster's kind each strategy needs at this sequence length (powers of two), and
    whether one sequence's activations outgrow a GPU at any count: ZeRO shards the model state over the
    GPUs but not the activations, which past that point need DeepSpeed-Ulysses sequence parallelism."""
    micro = cfg.train.micro_batch_size
    needs = {}
    for strategy in strategies:
        world = 1
        while world <= MAX_GPUS and not evaluate(cfg, inventory, strategy, world, micro).fits_gpu:
            world *= 2
        needs[strategy.label] = world if world <= MAX_GPUS else None
    # At the largest count the state is nearly gone: what is left is (mostly) one micro-batch's activations.
    floor = evaluate(cfg, inventory, strategies[0], MAX_GPUS, 1)
    acts = floor.estimate.activations
    activations_gib = acts.peak / GIB if acts is not None else 0.0
    degree = 1
    while degree <= 64 and gpu_need_gib(floor.estimate.gpu_peak - int(acts.peak * (1 - 1 / degree))) > (
        cfg.cluster.memory_gib
    ):
        degree *= 2
    return {
        "seq_len": cfg.data.packing.seq_len,
        "min_gpus": needs,
        "activations_gib_at_micro_batch_1": activations_gib,
        "sequence_parallel_degree": degree if degree <= 64 else None,
    }


def _variant_dict(v: Variant, configured: bool) -> dict[str, Any]:
    est = v.estimate
    return {
        "strategy": est.strategy.label,
        "configured": configured,
        "overrides": overrides_for(est.strategy),
        "gpu_allocated_gib": est.gpu_peak / GIB,
        "gpu_need_gib": v.gpu_need_gib,
        "peak_phase": est.peak_phase,
        "cpu_per_node_gib": v.cpu_per_node_gib,
        "fits_gpu": v.fits_gpu,
        "fits_cpu": v.fits_cpu,
        "resident_bytes": est.resident,
        "phase_bytes": est.phases,
        "cpu_bytes_per_rank": est.cpu,
    }


def _suggestions(cfg: PlanConfig, inventory: ParamInventory, variants: list[Variant]) -> list[str]:
    """Ways to make the configured run fit: another strategy, a smaller micro-batch, more nodes."""
    cluster, chosen = cfg.cluster, variants[0]
    out = [
        f"{v.estimate.strategy.label}: {v.gpu_need_gib:.1f} GiB per GPU, {v.cpu_per_node_gib:.0f} GiB host "
        f"per node: {overrides_for(v.estimate.strategy, chosen.estimate.strategy)}"
        for v in variants[1:]
        if v.fits
    ][:2]
    strategy, world = chosen.estimate.strategy, cluster.world_size
    micro = cfg.train.micro_batch_size // 2
    while micro >= 1:
        if evaluate(cfg, inventory, strategy, world, micro).fits:
            out.append(f"a smaller micro-batch: train.micro_batch_size={micro}")
            break
        micro //= 2
    nodes = cluster.nodes * 2
    while nodes <= 4096:
        if evaluate(cfg, inventory, strategy, nodes * cluster.gpus_per_node, cfg.train.micro_batch_size).fits:
            gpus = nodes * cluster.gpus_per_node
            out.append(f"more GPUs: {gpus} x {cluster.gpu} (cluster.nodes={nodes}, sbatch -N {nodes})")
            break
        nodes *= 2
    return out


@hydra.main(config_path=CONF_DIR, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config = typed_pretrain_config(cfg)
    assert isinstance(config, PlanConfig), type(config)
    plan = build_plan(config)
    text = json.dumps(plan, indent=1) + "\n" if config.plan.format == "json" else render_table(plan)
    sys.stdout.write(text)
    if config.plan.json_out:
        path = Path(config.plan.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1) + "\n")
