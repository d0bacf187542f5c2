"""Typed configs of the trainer, registered with Hydra's ConfigStore as schemas.

`PretrainConfig` is the whole run: the data pipeline's configs (paths, tokenizer, data) plus the model, the
optimizer, the DeepSpeed engine, the schedules, logging and checkpoints. `validate()` runs before any process
group is created, so a wrong value fails at once with a message that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.config import DataConfig, PathsConfig, TokenizerConfig, register_data_configs, require
from pretrain.model import ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, all measured in tokens (DESIGN contract 3)."""

    lr: float = 3e-4
    # The LR decays to min_lr_ratio * lr at the end of training.
    min_lr_ratio: float = 0.1
    warmup_tokens: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # By default norms and embeddings get no weight decay (as in LLaMA/OLMo).
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0

    def validate(self, key: str = "optim") -> None:
        require(self.lr > 0, f"{key}.lr", f"must be positive, got {self.lr}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_tokens >= 0, f"{key}.warmup_tokens", "must be >= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{key}.betas",
            "needs two values in [0, 1)",
        )
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class DeepSpeedConfig:
    """The knobs of the DeepSpeed engine; `pretrain.engine` turns them into DeepSpeed's JSON config."""

    zero_stage: int = 3
    precision: str = "bf16"
    # "none" or "cpu": ZeRO-Offload of the optimizer state / ZeRO-Infinity style parameter offload.
    offload_optimizer: str = "none"
    offload_param: str = "none"
    activation_checkpointing: bool = True
    # Checkpoint every N-th layer (1 = every layer).
    checkpoint_every_n_layers: int = 1
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    # Collective timeout: a hung rank makes the job fail instead of hanging forever.
    timeout_minutes: float = 30.0
    # Raw DeepSpeed keys merged last, for anything not modelled above.
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str = "deepspeed") -> None:
        require(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", "must be 0, 1, 2 or 3")
        require(self.precision in ("bf16", "fp32"), f"{key}.precision", "must be 'bf16' or 'fp32'")
        for name in ("offload_optimizer", "offload_param"):
            require(getattr(self, name) in ("none", "cpu"), f"{key}.{name}", "must be 'none' or 'cpu'")
        require(
            self.offload_param == "none" or self.zero_stage == 3,
            f"{key}.offload_param",
            "parameter offload needs deepspeed.zero_stage=3",
        )
        require(self.checkpoint_every_n_layers >= 1, f"{key}.checkpoint_every_n_layers", "must be at least 1")
        require(self.timeout_minutes > 0, f"{key}.timeout_minutes", "must be positive")


@dataclass
class TrainConfig:
    """How long to train and in what batches, all in tokens so that batch growth does not shift schedules."""

    # One run directory per run name: runs/<run_name>/ (checkpoints, logs, wandb).
    run_name: str = "default"
    seed: int = 1234
    total_tokens: int = MISSING
    # Final global batch, in tokens (a multiple of seq_len * micro_batch_size * world_size).
    global_batch_tokens: int = MISSING
    # Batch growth: start at this many tokens (0 = no growth) and reach the final size after ramp_tokens.
    start_batch_tokens: int = 0
    batch_ramp_tokens: int = 0
    # Sequences per rank per forward pass.
    micro_batch_size: int = 4
    # Validation every N optimizer steps (0 = only at the end) over this many global batches of held-out data.
    eval_every_steps: int = 0
    eval_batches: int = 4
    # Checkpoints every N steps (0 = only at the end), keep the newest K.
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    # `python -m pretrain` outside any launcher starts this many local processes (0 = one per GPU, or 2 on CPU).
    local_processes: int = 0
    # A short sample printed at the end (empty disables it).
    sample_prompt: str = "def "
    sample_tokens: int = 48
    # Fault handling: consecutive non-finite steps before the run aborts.
    max_bad_steps: int = 5
    # Stop after this many optimizer steps in this process (0 = no limit); for tests and preemption drills.
    stop_after_steps: int = 0

    def validate(self, key: str = "train") -> None:
        require(bool(self.run_name) and "/" not in self.run_name, f"{key}.run_name", "must be a plain name")
        require(self.total_tokens > 0, f"{key}.total_tokens", "must be positive")
        require(self.global_batch_tokens > 0, f"{key}.global_batch_tokens", "must be positive")
        require(self.micro_batch_size >= 1, f"{key}.micro_batch_size", "must be at least 1")
        require(self.start_batch_tokens >= 0, f"{key}.start_batch_tokens", "must be >= 0 (0 = no growth)")
        require(
            self.start_batch_tokens <= self.global_batch_tokens,
            f"{key}.start_batch_tokens",
            "must not exceed train.global_batch_tokens",
        )
        require(
            self.start_batch_tokens == 0 or self.global_batch_tokens % self.start_batch_tokens == 0,
            f"{key}.global_batch_tokens",
            "must be an integer multiple of train.start_batch_tokens (the batch grows in integer multiples)",
        )
        require(self.batch_ramp_tokens >= 0, f"{key}.batch_ramp_tokens", "must be >= 0")
        require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must keep at least 1")
        require(self.max_bad_steps >= 1, f"{key}.max_bad_steps", "must be at least 1")


@dataclass
class LoggingConfig:
    """Console and wandb logging; wandb is offline by default and needs no account."""

    wandb_mode: str = "offline"
    wandb_project: str = "llm-pretrain"
    wandb_entity: str | None = None
    log_every_steps: int = 1
    # Peak dense BF16 TFLOP/s used for MFU when the device is not in the built-in table (0 = use the table).
    peak_tflops: float = 0.0
    # Loss spikes: a loss this many standard deviations above the mean of the last `spike_window` steps is logged.
    spike_sigma: float = 6.0
    spike_window: int = 50

    def validate(self, key: str = "logging") -> None:
        modes = ("online", "offline", "disabled")
        require(
            self.wandb_mode in modes, f"{key}.wandb_mode", f"must be one of {modes}, got {self.wandb_mode!r}"
        )
        require(self.log_every_steps >= 1, f"{key}.log_every_steps", "must be at least 1")
        require(self.spike_window >= 2, f"{key}.spike_window", "must be at least 2")


@dataclass
class PretrainConfig:
    """The primary config of `python -m pretrain`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    log_level: str = "INFO"

    def validate(self) -> None:
        self.tokenizer.validate("tokenizer")
        self.data.validate("data")
        self.model.validate("model")
        self.optim.validate("optim")
        self.deepspeed.validate("deepspeed")
        self.train.validate("train")
        self.logging.validate("logging")
        seq_len = self.data.packing.seq_len
        require(
            seq_len <= self.model.max_seq_len,
            "data.packing.seq_len",
            f"{seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        for key in ("global_batch_tokens", "start_batch_tokens"):
            tokens = getattr(self.train, key)
            require(
                tokens % seq_len == 0,
                f"train.{key}",
                f"{tokens} is not a multiple of data.packing.seq_len={seq_len}",
            )

    @property
    def run_dir(self) -> str:
        return f"{self.paths.runs}/{self.train.run_name}"


def register_configs() -> None:
    """Store every schema so that yaml files in `conf/` (`defaults: [_schema]`) are typed."""
    register_data_configs()
    cs = ConfigStore.instance()
    cs.store(group="model", name="_schema", node=ModelConfig)
    cs.store(group="optim", name="_schema", node=OptimConfig)
    cs.store(group="deepspeed", name="_schema", node=DeepSpeedConfig)
    cs.store(group="train", name="_schema", node=TrainConfig)
    cs.store(group="logging", name="_schema", node=LoggingConfig)
    cs.store(name="_pretrain_schema", node=PretrainConfig)
