"""The model's config: its shape, RoPE and numerics, validated before anything is built.

It lives with the model, apart from the trainer's configs (`pretrain.config` re-exports it and turns its errors
into the run's `ConfigError`), so the model reads without Hydra or the data pipeline, the model, the planner and
the exporters read one definition, and a wrong value fails with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


class ModelConfigError(ValueError):
    """A model config value is wrong; the message names the key and what to do."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise a ModelConfigError naming `key` unless `ok`."""
    if not ok:
        raise ModelConfigError(f"{key}: {message}")


ATTENTION_BACKENDS = ("auto", "sdpa", "flex")

# Weight and compute dtypes by the one spelling every command accepts; the long names are aliases.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(name: str, key: str) -> str:
    """The canonical dtype name (fp32, bf16, fp16) for `name` or one of its long aliases."""
    canonical = DTYPE_ALIASES.get(name, name)
    require(canonical in DTYPES, key, f"must be one of {sorted(DTYPES)}, got {name!r}")
    return canonical


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (Mixtral); `num_experts: 0` keeps every layer dense.

    Each MoE layer has `num_experts` SwiGLU experts of width `expert_ffn_dim` and a router; every token goes to
    its `top_k` experts, weighted by a softmax over their router logits (Mixtral's renormalised top-k). Routing
    is dropless: every token is computed by every expert it picks, whatever the imbalance (no capacity factor).
    """

    num_experts: int = 0
    top_k: int = 2
    # Hidden width of each expert's SwiGLU; None = the model's ffn_dim.
    expert_ffn_dim: int | None = None
    # Layer i (from 0) is an MoE layer when (i + 1) % every_n_layers == 0: 1 = every layer (Mixtral), 2 = every
    # other layer (GShard, Switch).
    every_n_layers: int = 1
    # Switch Transformer's load-balancing loss, E * sum_e f_e * P_e per layer (f_e: share of the token-to-expert
    # assignments that went to e, P_e: mean router probability of e; 1 when perfectly balanced), times this.
    load_balance_coef: float = 0.01
    # ST-MoE's router z-loss, mean over tokens of logsumexp(router logits)^2, times this.
    z_loss_coef: float = 0.001

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and (index + 1) % self.every_n_layers == 0

    def validate(self, key: str) -> None:
        require(
            self.num_experts >= 0, f"{key}.num_experts", f"must be >= 0 (0 = dense), got {self.num_experts}"
        )
        if not self.enabled:
            for item in fields(self):
                if item.name != "num_experts":
                    default = getattr(MoEConfig, item.name)
                    require(
                        getattr(self, item.name) == default,
                        f"{key}.{item.name}",
                        f"is read only with experts ({key}.num_experts > 0); leave it at {default}",
                    )
            return
        require(
            1 <= self.top_k <= self.num_experts,
            f"{key}.top_k",
            f"must be between 1 and {key}.num_experts ({self.num_experts}), got {self.top_k}",
        )
        require(
            self.expert_ffn_dim is None or self.expert_ffn_dim >= 1,
            f"{key}.expert_ffn_dim",
            f"must be a positive integer or null (the model's ffn_dim), got {self.expert_ffn_dim}",
        )
        require(self.every_n_layers >= 1, f"{key}.every_n_layers", f"must be >= 1, got {self.every_n_layers}")
        for name in ("load_balance_coef", "z_loss_coef"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """Shape and numerics of the model; `validate()` names the offending key."""

    name: str = "tiny"
    vocab_size: int = 32000
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (multi-head attention).
    n_kv_heads: int | None = None
    # Hidden width of the SwiGLU block, given explicitly (LLaMA-2-7B: 11008).
    ffn_dim: int = 688
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    # RoPE for long contexts, three methods that combine. Base change ("ABF", adjusted base frequency, as in
    # Llama 2 Long with 500,000 and Code Llama with 1,000,000): raise rope_base for the continued pretraining;
    # the frequency of pair i is rope_base * rope_base_scaling raised to -2i / head_dim.
    rope_base: float = 10000.0
    # Multiplier on rope_base, kept for older configs; the effective base is `rope_theta`.
    rope_base_scaling: float = 1.0
    # Context-extension factor s (1.0 = off), applied as `rope_type` says.
    rope_scaling: float = 1.0
    # How rope_scaling is applied; at 1.0 either is plain RoPE (so "linear" is also the no-scaling default).
    # "linear": position interpolation, position p is rotated as p / s. "yarn": YaRN, which leaves the pairs
    # that turn many times within the original window alone, divides the frequency of those that turn less
    # than once by s, blends linearly in between, and multiplies cos and sin by an attention factor.
    rope_type: str = "linear"
    # YaRN only: the window the model was pretrained on (tokens); its pairs are classified against it.
    rope_original_max_seq_len: int | None = None
    # YaRN only: pairs with at least beta_fast turns in the original window are kept, those with at most
    # beta_slow turns are interpolated (the YaRN paper's beta and alpha).
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # YaRN only: the factor on cos and sin (so attention logits scale by its square); None = 0.1 ln(s) + 1.
    yarn_attention_factor: float | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    # "auto": FlexAttention for packed batches on CUDA, SDPA with a boolean mask otherwise. "flex" forces
    # FlexAttention (on CPU it is forward-only, for tests); "sdpa" always builds the [B, 1, T, T] mask.
    attention: str = "auto"
    # Rows of logits upcast to fp32 at a time in the loss (0 = all at once).
    loss_chunk_size: int = 2048
    # Sliding-window attention (Mistral): each token attends to the last `sliding_window` tokens of its
    # document, itself included (transformers' MistralConfig.sliding_window), in every layer; the receptive
    # field still grows by a window per layer. None = full causal attention.
    sliding_window: int | None = None
    # Mixture-of-Experts feed-forward layers; off by default (model.moe.num_experts=0).
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe.expert_ffn_dim or self.ffn_dim

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def windowed(self, length: int) -> bool:
        """Whether the sliding window excludes anything at `length` tokens (a window >= length is full attention)."""
        return self.sliding_window is not None and self.sliding_window < length

    @property
    def rope_theta(self) -> float:
        """The RoPE base the model rotates with (and the export's `rope_theta`): base times its multiplier."""
        return self.rope_base * self.rope_base_scaling

    def validate(self, key: str = "model") -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            require(
                getattr(self, name) >= 1,
                f"{key}.{name}",
                f"must be a positive integer, got {getattr(self, name)}",
            )
        require(
            self.dim % self.n_heads == 0,
            f"{key}.n_heads",
            f"must divide {key}.dim ({self.dim} % {self.n_heads} != 0)",
        )
        require(self.head_dim % 2 == 0, f"{key}.n_heads", f"{key}.dim / {key}.n_heads must be even for RoPE")
        require(
            self.kv_heads >= 1,
            f"{key}.n_kv_heads",
            f"must be a positive integer or null, got {self.n_kv_heads}",
        )
        require(
            self.n_heads % self.kv_heads == 0,
            f"{key}.n_kv_heads",
            f"must divide {key}.n_heads ({self.n_heads} % {self.kv_heads} != 0)",
        )
        for name in ("norm_eps", "rope_base", "rope_scaling", "rope_base_scaling", "init_std"):
            require(getattr(self, name) > 0, f"{key}.{name}", f"must be positive, got {getattr(self, name)}")
        self._validate_rope_scaling(key)
        require(
            self.attention in ATTENTION_BACKENDS,
            f"{key}.attention",
            f"must be one of {ATTENTION_BACKENDS}, got {self.attention!r}",
        )
        require(
            self.sliding_window is None or self.sliding_window >= 1,
            f"{key}.sliding_window",
            f"must be a positive number of tokens or null (full attention), got {self.sliding_window}",
        )
        self.moe.validate(f"{key}.moe")
        require(
            self.loss_chunk_size >= 0,
            f"{key}.loss_chunk_size",
            "must be >= 0 (0 computes the loss in one piece)",
        )

    def _validate_rope_scaling(self, key: str) -> None:
        """The YaRN keys are checked with YaRN and must keep their defaults without it, so no setting is ignored."""
        types = ("linear", "yarn")
        require(
            self.rope_type in types,
            f"{key}.rope_type",
            f"must be one of {types}, got {self.rope_type!r}",
        )
        yarn_only = ("rope_original_max_seq_len", "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow")
        if self.rope_type != "yarn":
            for name in yarn_only:
                default = getattr(ModelConfig, name)
                require(
                    getattr(self, name) == default,
                    f"{key}.{name}",
                    f"is read only by YaRN ({key}.rope_type=yarn); leave it at {default}",
                )
            return
        require(
            self.rope_scaling >= 1.0,
            f"{key}.rope_scaling",
            f"YaRN extends the context: must be >= 1, got {self.rope_scaling}",
        )
        require(
            self.rope_original_max_seq_len is not None and self.rope_original_max_seq_len >= 1,
            f"{key}.rope_original_max_seq_len",
            f"YaRN needs the pretraining window as a positive integer, got {self.rope_original_max_seq_len}",
        )
        # YaRN's factor is the extension ratio: transformers 4.51-4.55 recompute it from the exported
        # max_position_embeddings / original_max_position_embeddings, so any other value would be read differently.
        ratio = self.max_seq_len / self.rope_original_max_seq_len
        require(
            self.rope_scaling == ratio,
            f"{key}.rope_scaling",
            f"YaRN's factor is {key}.max_seq_len / {key}.rope_original_max_seq_len = {self.max_seq_len} / "
            f"{self.rope_original_max_seq_len}; set {key}.rope_scaling={ratio!r} (or change those two), "
            f"got {self.rope_scaling}",
        )
        require(
            self.yarn_beta_slow > 0, f"{key}.yarn_beta_slow", f"must be positive, got {self.yarn_beta_slow}"
        )
        require(
            self.yarn_beta_fast > self.yarn_beta_slow,
            f"{key}.yarn_beta_fast",
            f"must exceed {key}.yarn_beta_slow ({self.yarn_beta_fast} <= {self.yarn_beta_slow})",
        )
        require(
            self.yarn_attention_factor is None or self.yarn_attention_factor > 0,
            f"{key}.yarn_attention_factor",
            f"must be positive or null (0.1 ln(s) + 1), got {self.yarn_attention_factor}",
        )
