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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.cli import CONF_DIR, compose_conf, to_config
from pretrain.batching import schedule_layouts
from pretrain.config import ConfigError, PretrainConfig, register_configs, typed_pretrain_config
from pretrain.model.flops import count_active_parameters, count_parameters, flops_per_token
from pretrain.planning import memory_model as mm
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
# Assumed all-to-all bandwidth per GPU (bytes sent per second) for DeepSpeed-Ulysses, not measured here: within
# a node over NVLink (H100 SXM: 900 GB/s NVLink in all, about a third of it achieved by an all-to-all), and across
# nodes through one 400 Gb/s NIC per GPU. A group that spans nodes is bounded by its slowest link, the NIC.
ALL_TO_ALL_NVLINK_BYTES_PER_S = 300e9
ALL_TO_ALL_NETWORK_BYTES_PER_S = 50e9
ALL_TO_ALL_ASSUMPTION = "300 GB/s per GPU in a node (NVLink), 50 GB/s across nodes (a 400 Gb/s NIC per GPU)"


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
    cfg: PlanConfig, inventory: ParamInventory, strategy: Strategy, world: int, micro_batch: int, sp: int = 0
) -> Variant:
    """Memory of `strategy` on `world` GPUs of the cluster's kind, and whether GPUs and hosts hold it;
    `sp` > 0 replaces `deepspeed.sequence_parallel_size`."""
    precision = "fp32" if cfg.deepspeed.precision == "fp32" else "bf16"  # "auto" is bf16 on a GPU
    ds = replace(cfg.deepspeed, sequence_parallel_size=sp) if sp else cfg.deepspeed
    est = zero3_memory(
        inventory,
        cfg.model,
        ds,
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
    sp = cfg.deepspeed.sequence_parallel_size
    data_parallel = max(1, world // sp)

    warnings: list[str] = []
    if world % sp:
        warnings.append(
            f"deepspeed.sequence_parallel_size={sp} does not divide the {world} GPUs of the cluster"
        )
    try:
        schedule_layouts(batch.sizes(), seq_len, train.micro_batch_size, data_parallel)
    except ConfigError as err:
        ranks = (
            f"{data_parallel} data-parallel ranks of sequence parallel {sp}" if sp > 1 else f"{world} GPUs"
        )
        warnings.append(f"batch on {ranks}: {err}")
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
            "data_parallel_size": data_parallel,
            "grad_accumulation_final": _accumulation(cfg, data_parallel),
        },
        "sequence_parallel": sequence_parallel_traffic(cfg, sp, world),
        "memory": [_variant_dict(v, configured=i == 0) for i, v in enumerate(variants)],
        "zero_stage": cfg.deepspeed.zero_stage,
        "host_per_rank_gib": HOST_PER_RANK_GIB,
        "fits": chosen.fits,
        "warnings": warnings,
        "suggestions": suggestions,
        "scaling": scaling(cfg, inventory, strategies),
    }


MAX_GPUS = 4096


def _accumulation(cfg: PlanConfig, data_parallel: int) -> int:
    """Micro-batches per rank in one optimizer step at the final global batch."""
    per_step = cfg.data.packing.seq_len * cfg.train.micro_batch_size * data_parallel
    return max(1, cfg.train.global_batch_tokens // max(1, per_step))


def sequence_parallel_traffic(cfg: PlanConfig, sp: int, world: int) -> dict[str, Any]:
    """Ulysses all-to-all bytes one GPU sends per optimizer step, and their time at the assumed bandwidth.

    Per layer and micro-batch: the q, k, v and output exchange (`all_to_all_bytes`), once in forward and once in
    backward, and once more in the forward that activation checkpointing repeats (checkpointed layers only);
    times the micro-batches of the final global batch on `world / sp` data-parallel ranks."""
    model, ds = cfg.model, cfg.deepspeed
    precision = "fp32" if ds.precision == "fp32" else "bf16"
    recomputed = -(-model.n_layers // ds.checkpoint_every_n_layers) if ds.activation_checkpointing else 0
    layer = mm.all_to_all_bytes(model, cfg.train.micro_batch_size, cfg.data.packing.seq_len, sp, precision)
    per_step = layer * (2 * model.n_layers + recomputed) * _accumulation(cfg, max(1, world // sp))
    spans_nodes = sp > cfg.cluster.gpus_per_node
    bandwidth = ALL_TO_ALL_NETWORK_BYTES_PER_S if spans_nodes else ALL_TO_ALL_NVLINK_BYTES_PER_S
    return {
        "degree": sp,
        "spans_nodes": spans_nodes,
        "all_to_all_bytes_per_step_per_gpu": per_step,
        "assumed_bytes_per_second": bandwidth,
        "all_to_all_seconds_per_step": per_step / bandwidth,
        "assumption": ALL_TO_ALL_ASSUMPTION,
    }


def _min_gpus(cfg: PlanConfig, inventory: ParamInventory, strategy: Strategy, sp: int) -> int | None:
    """The fewest GPUs (sp times a power of two) on which `strategy` fits each GPU at sequence parallel `sp`."""
    counts = (sp << i for i in range((MAX_GPUS // sp).bit_length()))
    micro = cfg.train.micro_batch_size
    return next((n for n in counts if evaluate(cfg, inventory, strategy, n, micro, sp).fits_gpu), None)


def scaling(cfg: PlanConfig, inventory: ParamInventory, strategies: list[Strategy]) -> dict[str, Any]:
    """How many GPUs of the cluster's kind each strategy needs at this sequence length (powers of two), and, for
    the configured strategy, at each DeepSpeed-Ulysses degree. ZeRO-3 shards the model state over all GPUs but
    not a sequence's activations; sequence parallelism splits those over its SP ranks (`activation_memory`),
    at the price of the all-to-alls (`sequence_parallel_traffic`)."""
    micro, sp_now = cfg.train.micro_batch_size, cfg.deepspeed.sequence_parallel_size
    needs = {s.label: _min_gpus(cfg, inventory, s, sp_now) for s in strategies}
    # At micro-batch 1 and no sequence parallelism: one whole sequence's activations on one GPU.
    acts = evaluate(cfg, inventory, strategies[0], MAX_GPUS, 1, 1).estimate.activations
    degrees = []
    for sp in mm.sequence_parallel_degrees(cfg.model, cfg.data.packing.seq_len):
        gpus = _min_gpus(cfg, inventory, strategies[0], sp)
        at = evaluate(cfg, inventory, strategies[0], gpus or MAX_GPUS, micro, sp)
        peak = at.estimate.activations.peak if at.estimate.activations else 0
        entry = {
            "degree": sp,
            "min_gpus": gpus,
            "fits_one_node": bool(gpus and gpus <= cfg.cluster.gpus_per_node),
        }
        entry |= {"activations_gib": peak / GIB, "gpu_need_gib": at.gpu_need_gib}
        degrees.append(entry | (sequence_parallel_traffic(cfg, sp, gpus) if gpus else {}))
    fitting = [d for d in degrees if d["min_gpus"] is not None]
    smallest = fitting[0] if fitting else None
    one_node = next((d for d in fitting if d["fits_one_node"]), None)
    return {
        "seq_len": cfg.data.packing.seq_len,
        "strategy": strategies[0].label,
        "min_gpus": needs,
        "activations_gib_at_micro_batch_1": acts.peak / GIB if acts is not None else 0.0,
        # The smallest degree that fits at any GPU count, the GPUs it needs, and whether they are one node.
        "sequence_parallel_degree": smallest["degree"] if smallest else None,
        "sequence_parallel_gpus": smallest["min_gpus"] if smallest else None,
        "sequence_parallel_fits_one_node": bool(smallest and smallest["fits_one_node"]),
        "sequence_parallel_degree_one_node": one_node["degree"] if one_node else None,
        "sequence_parallel": degrees,
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
    """Ways to make the configured run fit: another strategy, a smaller micro-batch, sequence parallelism (over
    the cluster's GPUs), more nodes."""
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
    sp, micro = cfg.deepspeed.sequence_parallel_size, cfg.train.micro_batch_size
    for degree in mm.sequence_parallel_degrees(cfg.model, cfg.data.packing.seq_len):
        if (
            degree > sp
            and world % degree == 0
            and evaluate(cfg, inventory, strategy, world, micro, degree).fits
        ):
            out.append(f"sequence parallelism (DeepSpeed-Ulysses): deepspeed.sequence_parallel_size={degree}")
            break
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
