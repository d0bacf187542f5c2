"""Typed configs of the trainer, registered with Hydra's ConfigStore as schemas, and how they are composed.

`PretrainConfig` is the whole run: the data pipeline's configs (paths, tokenizer, data) plus the model, the
optimizer, the DeepSpeed engine, the schedules, logging and checkpoints. `validate()` runs before any process
group is created, so a wrong value fails at once with a message that names the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from data.cli import compose_conf, to_config
from data.config import (
    ConfigError,
    DataConfig,
    DataPipelineConfig,
    PathsConfig,
    TokenizerConfig,
    register_data_configs,
    require,
    whole_number,
)
from pretrain.batching import schedule_layouts
from pretrain.model.config import ATTENTION_BACKENDS, DTYPE_ALIASES, DTYPES, ModelConfig, ModelConfigError
from pretrain.model.config import dtype_name as _model_dtype_name
from pretrain.schedule import BatchSchedule

# Pretrain modules take these from here.
__all__ = [
    "ATTENTION_BACKENDS",
    "DTYPES",
    "DTYPE_ALIASES",
    "ConfigError",
    "ModelConfig",
    "dtype_name",
    "require",
    "whole_number",
]


@contextmanager
def model_errors_as_config_errors() -> Iterator[None]:
    """The model's own errors (it imports nothing of Hydra or `data/`) as the one error every command reports."""
    try:
        yield
    except ModelConfigError as err:
        raise ConfigError(str(err)) from err


def dtype_name(name: str, key: str) -> str:
    """The canonical dtype name (fp32, bf16, fp16) for `name` or one of its long aliases."""
    with model_errors_as_config_errors():
        return _model_dtype_name(name, key)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, measured in tokens so that batch growth leaves it in place."""

    lr: float = 3e-4
    # The LR decays to min_lr_ratio * lr at the end of training.
    min_lr_ratio: float = 0.1
    warmup_tokens: int | float = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # By default norms and embeddings get no weight decay (as in LLaMA/OLMo).
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0

    def validate(self, key: str = "optim") -> None:
        self.warmup_tokens = whole_number(self.warmup_tokens, f"{key}.warmup_tokens")
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


COUNT_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


@dataclass
class DeepSpeedConfig:
    """The knobs of the DeepSpeed engine; `pretrain.train.engine` turns them into DeepSpeed's JSON config."""

    zero_stage: int = 3
    # "auto": bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere (decided at start, logged).
    precision: str = "auto"
    # Gradients are accumulated over micro-batches and reduced across ranks in this dtype; "bf16" saves
    # memory and bandwidth at the cost of a gradient error that grows with the accumulation steps.
    gradient_dtype: str = "fp32"
    # "none" or "cpu": ZeRO-Offload of the optimizer state / ZeRO-Infinity style parameter offload.
    offload_optimizer: str = "none"
    offload_param: str = "none"
    activation_checkpointing: bool = True
    # Checkpoint every N-th layer (1 = every layer).
    checkpoint_every_n_layers: int = 1
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int | float = 50_000_000
    stage3_prefetch_bucket_size: int | float = 50_000_000
    stage3_param_persistence_threshold: int | float = 100_000
    stage3_max_live_parameters: int | float = 1_000_000_000
    stage3_max_reuse_distance: int | float = 1_000_000_000
    # Mixture-of-Experts: spread each MoE layer's experts over groups of this many ranks with DeepSpeed AutoEP
    # (expert parallelism: tokens travel to their experts by all-to-all); 0 = off, every rank gathers every
    # expert under plain ZeRO-3. Divides model.moe.num_experts and the world size.
    expert_parallel_size: int = 0
    # Sequence parallelism (DeepSpeed-Ulysses): each sequence is split over groups of this many consecutive ranks,
    # which trade it for a slice of the attention heads by all-to-all around each attention; 1 = off. Divides the
    # world size, model.n_heads, and model.kv_heads (or is a multiple of it); the data-parallel size is
    # world / this, and every batch size counts data-parallel ranks.
    sequence_parallel_size: int = 1
    # With sequence parallelism (or alone): run each SwiGLU over ceil(tokens per rank / model.dim) slices of the
    # sequence with DeepSpeed's TiledMLP, so its [tokens, ffn] intermediates exist one slice at a time.
    tiled_mlp: bool = False
    # TiledMLP's slices per sequence; 0 = ceil(tokens per rank / model.dim), as ALST chooses (raised to a divisor).
    tiled_mlp_shards: int = 0
    # Collective timeout: a hung rank makes the job fail instead of hanging forever.
    timeout_minutes: float = 30.0
    # Raw DeepSpeed keys merged last, for anything not modelled above.
    extra: dict[str, Any] = field(default_factory=dict)
    # Start even on a DeepSpeed outside the tested range (pretrain.train.versions.TESTED_DEEPSPEED): its gradient
    # scaling and internals were not verified by the test suite; the start-up gradient-scale probe still runs.
    allow_untested_version: bool = False

    def validate(self, key: str = "deepspeed") -> None:
        for name in COUNT_KEYS:
            setattr(self, name, whole_number(getattr(self, name), f"{key}.{name}"))
        require(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", "must be 0, 1, 2 or 3")
        require(
            self.precision in ("auto", "bf16", "fp32"), f"{key}.precision", "must be 'auto', 'bf16' or 'fp32'"
        )
        require(self.gradient_dtype in ("fp32", "bf16"), f"{key}.gradient_dtype", "must be 'fp32' or 'bf16'")
        for name in ("offload_optimizer", "offload_param"):
            require(getattr(self, name) in ("none", "cpu"), f"{key}.{name}", "must be 'none' or 'cpu'")
        require(
            self.offload_param == "none" or self.zero_stage == 3,
            f"{key}.offload_param",
            "parameter offload needs deepspeed.zero_stage=3",
        )
        require(self.checkpoint_every_n_layers >= 1, f"{key}.checkpoint_every_n_layers", "must be at least 1")
        require(self.expert_parallel_size >= 0, f"{key}.expert_parallel_size", "must be 0 (off) or positive")
        require(self.sequence_parallel_size >= 1, f"{key}.sequence_parallel_size", "must be 1 (off) or more")
        require(
            self.sequence_parallel_size == 1 or not self.expert_parallel_size,
            f"{key}.sequence_parallel_size",
            "DeepSpeed AutoEP under ZeRO-3 does not support sequence parallelism; set "
            f"{key}.expert_parallel_size=0 or {key}.sequence_parallel_size=1",
        )
        require(isinstance(self.tiled_mlp, bool), f"{key}.tiled_mlp", "must be true or false")
        require(self.tiled_mlp_shards >= 0, f"{key}.tiled_mlp_shards", "must be 0 (automatic) or positive")
        require(self.timeout_minutes > 0, f"{key}.timeout_minutes", "must be positive")
        require(
            isinstance(self.allow_untested_version, bool),
            f"{key}.allow_untested_version",
            "must be true or false",
        )


INIT_DATA_POSITIONS = ("auto", "continue", "fresh")


@dataclass
class TrainConfig:
    """How long to train and in what batches, all in tokens so that batch growth does not shift schedules."""

    # One run directory per run name: runs/<run_name>/ (checkpoints, logs, wandb).
    run_name: str = "default"
    seed: int = 1234
    # A stage starts from another run's weights: a run directory (its newest usable checkpoint) or one
    # checkpoint directory. Only the first start of the stage reads it; a restart resumes the stage itself.
    init_from: str | None = None
    # With init_from: also continue the parent's AdamW moments (an annealing stage); by default the optimizer
    # starts fresh, and the stage has its own token schedule either way.
    init_optimizer: bool = False
    # With init_from: `continue` reads the samples the parent would have read next (decay on the same stream,
    # WSD/MiniCPM); `fresh` starts at sample 0 (a new mixture: Llama 3 annealing, OLMo 2 mid-training, long
    # context); `auto` continues when the stage's sample order (data fingerprint) equals the parent's.
    init_data_position: str = "auto"
    # Slots, padding included: every schedule (LR, batch ramp) counts these; `train/target_tokens_total` logs
    # the real target tokens beside them.
    total_tokens: int | float = MISSING
    # Final global batch, in tokens (a multiple of seq_len * micro_batch_size * world_size).
    global_batch_tokens: int | float = MISSING
    # Batch growth: start at this many tokens (0 = no growth) and reach the final size after ramp_tokens.
    start_batch_tokens: int | float = 0
    batch_ramp_tokens: int | float = 0
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
    # At the end of training, also run the long-context suite (loss by position, copy probe, passkey; see
    # `python -m pretrain.evaluate long_context=true`), write it to runs/<name>/eval/ and log it to wandb.
    eval_long_context: bool = False
    # A short sample printed at the end (empty disables it).
    sample_prompt: str = "def "
    sample_tokens: int = 48
    # Fault handling: consecutive non-finite steps before the run aborts.
    max_bad_steps: int = 5
    # Build the next global batch on a background thread during the step (used only when the step asks for
    # exactly that batch, so the batches never depend on timing).
    prefetch_batches: bool = True
    # Stop after this many optimizer steps in this process (0 = no limit); for tests and preemption drills.
    stop_after_steps: int = 0
    # Before building the engine, compare the planner's memory need per rank with the device (GPU memory, or
    # host memory for CPU ranks and offload) and stop when it cannot fit; false lets an expert proceed.
    check_memory: bool = True

    def validate(self, key: str = "train") -> None:
        for name in ("total_tokens", "global_batch_tokens", "start_batch_tokens", "batch_ramp_tokens"):
            setattr(self, name, whole_number(getattr(self, name), f"{key}.{name}"))
        require(bool(self.run_name) and "/" not in self.run_name, f"{key}.run_name", "must be a plain name")
        require(
            not self.init_optimizer or bool(self.init_from),
            f"{key}.init_optimizer",
            "continues a parent's optimizer: set train.init_from too",
        )
        position, choices = self.init_data_position, INIT_DATA_POSITIONS
        require(
            position in choices, f"{key}.init_data_position", f"must be one of {choices}, got {position!r}"
        )
        require(
            self.init_data_position == "auto" or bool(self.init_from),
            f"{key}.init_data_position",
            "chooses where a stage's data starts relative to its parent: set train.init_from too",
        )
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
        with model_errors_as_config_errors():
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
        experts, ep = self.model.moe.num_experts, self.deepspeed.expert_parallel_size
        if ep:
            require(
                experts > 0, "deepspeed.expert_parallel_size", "needs an MoE model (model.moe.num_experts)"
            )
            require(
                experts % ep == 0,
                "deepspeed.expert_parallel_size",
                f"{ep} does not divide model.moe.num_experts={experts}",
            )
            require(
                self.deepspeed.zero_stage == 3,
                "deepspeed.expert_parallel_size",
                "is built for deepspeed.zero_stage=3 (AutoEP's ZeRO-1/2 path needs DeepSpeed's own optimizer)",
            )
        sp, heads, kv = self.deepspeed.sequence_parallel_size, self.model.n_heads, self.model.kv_heads
        if sp > 1:
            key = "deepspeed.sequence_parallel_size"
            require(heads % sp == 0, key, f"{sp} does not divide model.n_heads={heads}")
            require(
                kv % sp == 0 or sp % kv == 0, key, f"{sp} and model.kv_heads={kv} must divide one another"
            )
            require(seq_len % sp == 0, key, f"{sp} does not divide data.packing.seq_len={seq_len}")
        # Every batch size must at least divide on one rank; the world size is checked again at start.
        schedule_layouts(self.batch_schedule().sizes(), seq_len, self.train.micro_batch_size, world_size=1)

    def batch_schedule(self) -> BatchSchedule:
        return BatchSchedule(
            self.train.global_batch_tokens, self.train.start_batch_tokens, self.train.batch_ramp_tokens
        )

    @property
    def run_dir(self) -> str:
        return f"{self.paths.runs}/{self.train.run_name}"

    def data_pipeline(self) -> DataPipelineConfig:
        """The data commands' view of this run: the same paths, tokenizer and corpus."""
        return DataPipelineConfig(
            paths=self.paths, tokenizer=self.tokenizer, data=self.data, log_level=self.log_level
        )


def register_configs() -> None:
    """Store the primary schema: every group's yaml in `conf/` merges onto its typed node, so a misspelt key or a
    wrong type fails at composition (and `--help` lists only real options)."""
    register_data_configs()
    ConfigStore.instance().store(name="_pretrain_schema", node=PretrainConfig)


register_configs()


def typed_pretrain_config(cfg: DictConfig) -> PretrainConfig:
    """Resolve, convert to dataclasses and validate, before any process group exists."""
    return to_config(cfg, PretrainConfig)


def compose_pretrain_config(overrides: list[str] | None = None) -> PretrainConfig:
    """`conf/config.yaml` with overrides, outside `@hydra.main` (tests, tools, benchmarks)."""
    return to_config(compose_conf("config", overrides), PretrainConfig)
