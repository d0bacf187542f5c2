"""The one module that knows DeepSpeed: process group, DeepSpeed config, ZeRO-3 model construction, engine.

Everything else talks to `TrainingEngine`, so the model stays a plain `nn.Module` and the trainer never sees
a DeepSpeed key.
"""

from __future__ import annotations

import gc
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from data.loader import IGNORE_INDEX
from data.log import get_logger
from pretrain.batching import BatchLayout
from pretrain.config import ConfigError, PretrainConfig
from pretrain.model.parameter_groups import parameter_groups
from pretrain.model.transformer import Transformer
from pretrain.planning.hardware import cpu_threads_per_rank, resolve_precision
from pretrain.train import versions
from pretrain.train.collectives import barrier, broadcast_object
from pretrain.train.dist_env import DistEnv, cuda_device_index, dist_env, launch_environment
from pretrain.train.expert_parallel import (
    attach_expert_parallel_routers,
    autoep_config,
    check_checkpoint_layout,
)
from pretrain.train.metrics import RouterStats
from pretrain.train.optimizer import build_optimizer, deepspeed_fused_adam_prebuilt
from pretrain.train.sequence_parallel import SequenceParallel, attach_tiled_mlp, init_sequence_parallel

log = get_logger(__name__)

# torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; the warning would print on every step.
warnings.filterwarnings(
    "ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*"
)


def init_distributed(timeout_minutes: float) -> DistEnv:
    """Join the process group that the launcher (ours, torchrun, deepspeed or srun) described in the env, as
    `pretrain.train.dist_env` reads and checks it; each rank takes its GPU and its share of the host's cores (on a GPU
    node too: DeepSpeed's CPU Adam under optimizer offload runs on those threads)."""
    import deepspeed

    os.environ.update(launch_environment(os.environ))
    # NCCL: a collective that outlives the timeout aborts the process instead of hanging (gloo raises anyway).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    torch.set_num_threads(cpu_threads_per_rank())
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        device = cuda_device_index(local_rank, torch.cuda.device_count())
        if device != local_rank:  # one GPU bound to this task: DeepSpeed picks its device by LOCAL_RANK
            os.environ["LOCAL_RANK"] = str(device)
        torch.cuda.set_device(device)
    env = dist_env(os.environ)
    log.info(
        "%d ranks on %s, %d threads per rank",
        env.world_size,
        "GPU" if torch.cuda.is_available() else "CPU",
        torch.get_num_threads(),
    )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(
            dist_backend=backend, timeout=timedelta(minutes=timeout_minutes), verbose=False
        )
    return env


def merge_deep(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in key by key at every depth (a nested key replaces only itself)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_deep(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: PretrainConfig, layout: BatchLayout, precision: str = "bf16") -> dict[str, Any]:
    """DeepSpeed's JSON config, generated from the Hydra config, for the batch `layout` and the resolved
    `precision`. Gradients are accumulated and reduced in `deepspeed.gradient_dtype` (fp32 by default), as
    Megatron and torchtitan do: DeepSpeed would otherwise use the model dtype for both."""
    ds = cfg.deepspeed
    grad_dtype = ds.gradient_dtype if precision == "bf16" else "fp32"
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_max_live_parameters=ds.stage3_max_live_parameters,
            stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    pin = torch.cuda.is_available()
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_batch_size": layout.sequences,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "data_types": {"grad_accum_dtype": grad_dtype},
        "communication_data_type": grad_dtype,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.expert_parallel_size:
        config["expert_parallel"] = autoep_config(cfg)
    if ds.sequence_parallel_size > 1:
        config["sequence_parallel_size"] = ds.sequence_parallel_size
    return merge_deep(config, ds.extra)


@dataclass(frozen=True)
class OptimizerStep:
    """What one optimizer step did: the global gradient norm before clipping, and whether the step was skipped
    (a non-finite gradient)."""

    grad_norm: float
    skipped: bool


class TrainingEngine:
    """A DeepSpeed engine over the model, with the few operations the trainer needs."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv, layout: BatchLayout):
        import deepspeed

        versions.check_deepspeed_version(deepspeed.__version__, cfg.deepspeed.allow_untested_version)
        self.cfg = cfg
        self.env = env
        # Decided on rank 0 and shared, so every rank builds the same engine even on mixed hardware.
        self.precision, why = broadcast_object(resolve_precision(cfg.deepspeed.precision))
        log.info("training in %s (%s)", self.precision, why)
        self.ds_config = deepspeed_config(cfg, layout, self.precision)
        ep = cfg.deepspeed.expert_parallel_size
        check_checkpoint_layout(cfg)
        if ep and env.world_size % ep:
            raise ConfigError(
                f"deepspeed.expert_parallel_size={ep} does not divide the {env.world_size} ranks: choose a divisor "
                "of the world size (expert-parallel groups never span a partial set of ranks)"
            )
        mpu = init_sequence_parallel(cfg, env.world_size)  # DeepSpeed's sequence-parallel groups, or None
        self.sequence_parallel = SequenceParallel(cfg, mpu)
        self.layout = layout
        # Before the (costly) model: every rank runs the probe, a collective, on the run's own ZeRO config.
        versions.check_gradient_scale(self.ds_config, env.world_size, mpu)
        zero3 = cfg.deepspeed.zero_stage == 3
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, mpu=mpu, enabled=zero3):
            model = Transformer(cfg.model)
        if cfg.deepspeed.activation_checkpointing:
            model.set_activation_checkpointing(_checkpoint_fn(), cfg.deepspeed.checkpoint_every_n_layers)
        groups = parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norms_and_embeddings)
        self.decay_parameter_names = _names_in(model, groups[0]["params"])
        # Decided on rank 0, so every rank steps with the same kernel.
        prebuilt = torch.cuda.is_available() and broadcast_object(deepspeed_fused_adam_prebuilt())
        optimizer = build_optimizer(cfg, groups, fused_adam_prebuilt=prebuilt)
        log.info(
            "optimizer: %s%s", type(optimizer).__name__, " (fused)" if optimizer.defaults.get("fused") else ""
        )
        self.initial_group_hyperparameters = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        self.deepspeed_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, mpu=mpu, dist_init_required=False
        )
        self.model = model
        attach_expert_parallel_routers(model)
        self.sequence_parallel.attach(model)
        if cfg.deepspeed.tiled_mlp:
            attach_tiled_mlp(model, cfg.deepspeed.tiled_mlp_shards)
        self.router_stats = RouterStats(
            [i for i in range(cfg.model.n_layers) if cfg.model.moe.is_moe_layer(i)]
        )
        self.device = torch.device(self.deepspeed_engine.device)

    # -- batch and LR -------------------------------------------------------------------------------------
    def set_batch(self, layout: BatchLayout) -> None:
        """Resize the global batch through DeepSpeed (its accumulation steps follow). With sequence parallelism
        DeepSpeed 0.19.8 cannot resize (its data-parallel size is unset under Ulysses' groups); nothing needs it
        to, as the accumulation boundary is set per micro-batch and `accumulation_steps` follows the layout."""
        self.layout = layout
        if (
            not self.sequence_parallel.enabled
            and layout.sequences != self.deepspeed_engine.train_batch_size()
        ):
            self.deepspeed_engine.set_train_batch_size(layout.sequences)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- one training step: a backward per micro-batch, then one optimizer step ---------------------------
    def backward(
        self, batch: dict[str, torch.Tensor], *, last: bool, global_targets: int, poison: bool = False
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed token loss (no optimizer step).

        The gradient is that of the mean loss per target token of the whole global batch (`global_targets`
        over every micro-batch and rank), as torchtitan and OLMo-core normalise: each micro-batch's summed
        loss is scaled by world_size / global_targets, and DeepSpeed's own division by the accumulation steps
        is turned off, so after its average over ranks every target token weighs the same, whatever the
        micro-batch size, the padding or the number of ranks. With sequence parallelism the batch is this rank's
        slice of its group's sequences and `global_targets` counts each target once (on the rank that holds it);
        DeepSpeed still averages over every rank, so the scale is the same (checked at start by the probe).

        ZeRO-3 reduces the gradients across ranks at the gradient-accumulation boundary, `last`, the final
        micro-batch of the global batch. The boundary is set explicitly rather than left to DeepSpeed's
        micro-step counter: that counter is not restored from checkpoints, and when the batch grows it would
        fall out of step with the global batch. `poison` (a fault drill) turns the loss into NaN.
        """
        self.deepspeed_engine.set_gradient_accumulation_boundary(last)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss_sum = self.deepspeed_engine(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            document_ids=batch.get("document_ids"),
            labels=batch["labels"],
            reduction="sum",
            sequence_sliced=self.sequence_parallel.enabled,
        )
        if poison:
            loss_sum = loss_sum * float("nan")
        scale = self.env.world_size / max(1, global_targets)
        objective = loss_sum * scale
        if self.model.router_loss is not None:
            # MoE: the router losses of each micro-batch weigh 1 / accumulation steps, so after DeepSpeed's
            # average over ranks the objective holds their mean over every micro-batch of the global batch
            # (as Megatron-Core, which sums the layers where the model averages them); their statistics are
            # kept for the step log.
            objective = objective + self.model.router_loss / self.accumulation_steps
            self.router_stats.add(self.model.router_stats)
            self.model.router_loss = None
        self.deepspeed_engine.backward(objective, scale_wrt_gas=False)
        return loss_sum.detach()

    def optimizer_step(self) -> OptimizerStep:
        """The update of one global batch, after the backward of its last micro-batch. Both halves happen
        inside DeepSpeed's `step()` on ZeRO-3's partitioned fp32 optimizer: the gradient is clipped to
        `deepspeed.gradient_clipping` (its global norm over every rank's partition), then AdamW steps. When that
        norm is not finite DeepSpeed skips the update and drops the gradients, leaving weights and optimizer
        state unchanged; the step reports it as skipped."""
        skipped_before = self.skipped_steps
        self.deepspeed_engine.step()
        grad_norm = self.last_grad_norm()
        skipped = self.skipped_steps > skipped_before
        if not skipped and not math.isfinite(grad_norm):
            raise RuntimeError(
                f"gradient norm {grad_norm} and DeepSpeed applied the step anyway; this DeepSpeed version does"
                " not skip non-finite BF16 steps under ZeRO-3, upgrade it"
            )
        return OptimizerStep(grad_norm=grad_norm, skipped=skipped)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step of the current global batch."""
        return self.layout.accumulation

    def compile(self) -> None:
        """torch.compile the model inside the DeepSpeed engine (DeepSpeed's own entry, hooks kept)."""
        self.deepspeed_engine.compile()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped because the gradients were not finite."""
        return int(self.deepspeed_engine.skipped_steps)

    def last_grad_norm(self) -> float:
        """The global gradient norm (before clipping) of the last optimizer step."""
        norm = self.deepspeed_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Summed token loss and token count of one micro-batch, for exact averages across ranks."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.deepspeed_engine.eval()
        loss_sum = self.deepspeed_engine(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
            labels=batch["labels"],
            reduction="sum",
            sequence_sliced=self.sequence_parallel.enabled,
        )
        self.deepspeed_engine.train()
        return float(loss_sum), int((batch["labels"] != IGNORE_INDEX).sum())

    def local_parameter_count(self) -> tuple[int, int]:
        """(elements held by this rank, total elements): ZeRO-3 holds about total / world_size per rank."""
        local = total = 0
        for param in self.model.parameters():
            if hasattr(param, "ds_tensor"):
                local += param.ds_tensor.numel()
                total += param.ds_numel
            else:
                local += param.numel()
                total += param.numel()
        return local, total

    # -- checkpoints (the format is DeepSpeed's; commit and selection live in pretrain.checkpoint) ----------
    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        # Each group's hyperparameters travel with the checkpoint: a universal load needs them back (below).
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = {**client_state, "param_groups": groups}
        self.deepspeed_engine.save_checkpoint(directory, tag=tag, client_state=state, save_latest=False)

    def checkpoint_files(self) -> list[str]:
        """The files `save` writes on this rank into a checkpoint directory (DeepSpeed's names, checked in
        `pretrain.train.versions`), so the commit can check that each one arrived."""
        return versions.checkpoint_file_names(self.deepspeed_engine)

    def load(self, directory: str, tag: str, *, universal: bool = False) -> dict[str, Any]:
        """Load a checkpoint written at this world size, or with `universal` DeepSpeed's universal copy of one
        written at any world size (`pretrain.checkpoint.reshard`)."""
        versions.set_universal_load(
            self.deepspeed_engine, universal
        )  # a DeepSpeed 0.19.8 private, checked there
        try:
            path, client_state = self.deepspeed_engine.load_checkpoint(
                directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        finally:  # later loads and every save are the normal kind
            versions.set_universal_load(self.deepspeed_engine, False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}/{tag}")
        client_state = client_state or {}
        if universal:
            self._repair_universal_load(client_state.get("param_groups"))
        self._unshare_step_counters()
        return client_state

    def restart_optimizer(self, keep_moments: bool) -> None:
        """A stage's optimizer after loading its parent: the new run's hyperparameters in every group, and
        unless `keep_moments` the AdamW state of a fresh optimizer (zero moments, step 0), which is exactly what
        torch's AdamW starts from, while the fp32 master weights keep the parent's full precision."""
        inner = versions.inner_optimizer(
            self.deepspeed_engine
        )  # DeepSpeed 0.19.8's wrapper.optimizer, checked there
        for group, initial in zip(inner.param_groups, self.initial_group_hyperparameters, strict=True):
            group.update({key: initial[key] for key in ("weight_decay", "betas", "eps")})
        if keep_moments:
            return
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif key == "step":
                    state[key] = 0

    def _repair_universal_load(self, saved_groups: list[dict[str, Any]] | None) -> None:
        """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the first group's
        hyperparameters, so the no-decay group would come back decaying; restore each group's own (those saved
        with the checkpoint, or for a checkpoint without them, this run's)."""
        groups = versions.inner_optimizer(
            self.deepspeed_engine
        ).param_groups  # DeepSpeed 0.19.8's wrapper.optimizer
        if saved_groups is None:
            saved_groups = self.initial_group_hyperparameters
        if len(saved_groups) != len(groups):
            raise RuntimeError(
                f"the checkpoint has {len(saved_groups)} optimizer parameter groups, the engine {len(groups)}"
            )
        for group, saved in zip(groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _unshare_step_counters(self) -> None:
        """Give every ZeRO-3 sub-group its own Adam step counter. DeepSpeed 0.19's universal load puts one step
        tensor into all of them, and ZeRO-3 steps each sub-group separately, so the shared counter would
        advance once per sub-group per step (a wrong bias correction ever after, saved into every later
        checkpoint). Harmless after any other load. Only ZeRO-3 is repaired, as it always was here."""
        if self.cfg.deepspeed.zero_stage != 3:
            return
        inner = versions.inner_optimizer(self.deepspeed_engine)
        for flat in versions.zero3_fp32_partitions(
            self.deepspeed_engine
        ):  # DeepSpeed 0.19.8 privates, checked there
            state = inner.state.get(flat, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _names_in(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [name for name, param in model.named_parameters() if id(param) in ids]


def _checkpoint_fn():
    """Activation checkpointing for a block: torch's non-reentrant recompute, which works with ZeRO-3 hooks.
    A block holds no randomness (no dropout), so the recompute needs no saved RNG state: without
    `preserve_rng_state` torch neither stashes nor restores the CPU and CUDA generators for every block."""
    from torch.utils.checkpoint import checkpoint

    def run(block, *args, **kwargs):
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def shutdown(*, clean: bool = True) -> None:
    """Leave the process group while the interpreter is still whole.

    On a clean exit every rank first meets at a barrier, so no rank closes its sockets while a peer is still
    talking to it (after a failure a barrier would only wait out the collective timeout, so it is skipped).
    DeepSpeed's own destroy also drops the group handles it keeps in module globals, and the collection
    that follows frees the gloo/NCCL groups now. Left to interpreter finalization, a gloo group's worker
    threads can abort a rank that finished its work ("terminate called without an active exception").
    """
    import deepspeed.comm as ds_comm

    if not dist.is_initialized():
        return
    if clean:
        barrier()
    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()
