"""The reference the trainer is compared with: `transformers.LlamaForCausalLM` under the same DeepSpeed ZeRO-3.

Used by `benchmarks/gpu_throughput.py` inside a rank process of its own. Everything that could make the two
differ for reasons other than the model code is taken from our own trainer's pieces:

* the shapes: `pretrain.evaluation.export.llama_config` turns our `ModelConfig` into the LlamaConfig an export would write
  (same width, depth, heads, KV heads, FFN width, vocabulary, RoPE), so both models have the same parameters
  and the same `pretrain.model.transformer.flops_per_token`;
* the engine: `pretrain.train.engine.deepspeed_config` (ZeRO stage and knobs, BF16, clipping, micro-batch and
  accumulation) and the same optimizer (`pretrain.train.engine.parameter_groups`, FusedAdam on CUDA, AdamW on CPU,
  DeepSpeedCPUAdam with optimizer offload);
* activation checkpointing on every layer when the config asks for it (Hugging Face's own, non-reentrant).

Attention is `attn_implementation="sdpa"` with no attention mask, i.e. causal SDPA (flash on an H100/H200). The
model is built under `deepspeed.zero.Init` directly, as a hand-written DeepSpeed loop would, so it works without
`accelerate`; its weights then keep PyTorch's default initialization, which does not change the work done.
The loss is Hugging Face's own: logits for the whole micro-batch, upcast to fp32 for the cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.batching import BatchLayout
from pretrain.config import PretrainConfig
from pretrain.evaluation.export import llama_config
from pretrain.model.parameter_groups import parameter_groups
from pretrain.planning.hardware import resolve_precision
from pretrain.train import collectives
from pretrain.train import engine as eng


def hf_llama_config(cfg: PretrainConfig) -> Any:
    """The `transformers.LlamaConfig` equivalent to our model config (training: no KV cache)."""
    from transformers import LlamaConfig

    fields = llama_config(cfg.model, bos_id=1, eos_id=2, pad_id=0, dtype="bfloat16")
    fields.pop("architectures", None)
    fields.pop("model_type", None)
    fields["use_cache"] = False
    # No padding row: under zero.Init the embedding is already partitioned when Hugging Face would zero it.
    fields["pad_token_id"] = None
    return LlamaConfig(**fields)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face's activation checkpointing on every layer; the method was renamed in transformers 5.2x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFEngine:
    """LlamaForCausalLM wrapped by DeepSpeed exactly as `pretrain.train.engine.TrainingEngine` wraps our model."""

    def __init__(self, cfg: PretrainConfig, env: eng.DistEnv, layout: BatchLayout):
        import deepspeed
        from transformers import LlamaForCausalLM

        if cfg.deepspeed.checkpoint_every_n_layers != 1 and cfg.deepspeed.activation_checkpointing:
            raise ValueError(
                "the Hugging Face baseline checkpoints every layer; run it with"
                " deepspeed.checkpoint_every_n_layers=1 (or --no-baseline)"
            )
        self.precision, _ = collectives.broadcast_object(resolve_precision(cfg.deepspeed.precision))
        self.ds_config = eng.deepspeed_config(cfg, layout, self.precision)
        config = hf_llama_config(cfg)
        config._attn_implementation = "sdpa"
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=cfg.deepspeed.zero_stage == 3):
            model = LlamaForCausalLM(config)
        if cfg.deepspeed.activation_checkpointing:
            _enable_checkpointing(model)
        model.train()
        groups = parameter_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norms_and_embeddings)
        optimizer = eng.build_optimizer(cfg, groups)
        self.deepspeed_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = model
        self.device = torch.device(self.deepspeed_engine.device)
        self.attn_implementation = model.config._attn_implementation

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(
        self, batch: dict[str, torch.Tensor], *, last: bool, global_targets: int = 0
    ) -> torch.Tensor:
        """One micro-batch with Hugging Face's own loss (a mean per micro-batch, `global_targets` unused): it
        shifts the labels itself, so the unshifted input ids are the labels."""
        self.deepspeed_engine.set_gradient_accumulation_boundary(last)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        loss = self.deepspeed_engine(input_ids=input_ids, labels=input_ids).loss
        self.deepspeed_engine.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> None:
        self.deepspeed_engine.step()

    @property
    def accumulation_steps(self) -> int:
        return self.deepspeed_engine.gradient_accumulation_steps()

    def compile(self) -> None:
        self.deepspeed_engine.compile()

    def parameter_count(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
