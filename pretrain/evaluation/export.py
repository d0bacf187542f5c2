"""A trained checkpoint as a Hugging Face model directory: `python -m pretrain.export runs/<name> [out=DIR]`.

A full-attention model is a `LlamaForCausalLM`; one with `model.sliding_window` is a `MistralForCausalLM` (the
same weights and names, plus the window), which transformers masks exactly as we train; an MoE model
(`model.moe`) is a `MixtralForCausalLM`, its file in the layout Mixtral is published in (`block_sparse_moe.gate`,
one `w1`/`w3`/`w2` per expert), which transformers 4 and 5 and vLLM all read.

The ZeRO-3 shards are consolidated on CPU into one fp32 state dict by DeepSpeed's own `zero_to_fp32` (no process
group, no GPU; `pretrain.checkpoint`), renamed to Hugging Face's Llama names and written as `model.safetensors`
next to a `config.json`, a `generation_config.json` and the run's tokenizer files.
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` then load it, and
so does anything built on them (lm-evaluation-harness, vLLM). The config is written as plain JSON so that
exporting never needs transformers installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from data.atomic_io import atomic_write_json, atomic_write_text, replace_dir
from data.log import get_logger
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import CheckpointError, check_state_dict, newest_weights
from pretrain.config import DTYPES, ModelConfig, dtype_name
from pretrain.evaluation.cli import hydra_command

log = get_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Our parameter names -> Hugging Face Llama's (inside `model.`); the rest of each name is the same.
_LAYER_RENAMES = (
    ("attn_norm.", "input_layernorm."),
    ("attn.", "self_attn."),
    ("mlp_norm.", "post_attention_layernorm."),
    ("mlp.router.", "mlp.gate."),  # an MoE layer's router; its experts keep their names and layout
    ("mlp.", "mlp."),
)
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


class ExportError(CheckpointError):
    """A checkpoint that cannot be exported as asked, with what to do about it."""


def hf_name(name: str) -> str:
    """Our parameter name as Hugging Face Llama's."""
    if name == "lm_head.weight":
        return name
    match = _LAYER_NAME.match(name)
    if match is None:
        return f"model.{name}"  # embed_tokens.weight, norm.weight
    index, rest = match.groups()
    for ours, theirs in _LAYER_RENAMES:
        if rest.startswith(ours):
            return f"model.layers.{index}.{theirs}{rest[len(ours) :]}"
    raise ExportError(f"no Hugging Face Llama name for parameter {name!r}")


def hf_state_dict(
    state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Renamed, cast, contiguous tensors, each with its own storage (safetensors refuses shared memory).

    Only a tensor whose storage was already used is copied, so a large fp32 export does not hold two copies of
    the weights. With tied embeddings `lm_head.weight` is left out: Hugging Face re-ties it to the embedding.
    """
    out = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        converted = tensor.detach().to("cpu", dtype).contiguous()
        if converted.untyped_storage().data_ptr() in storages:
            converted = converted.clone()
        storages.add(converted.untyped_storage().data_ptr())
        out[hf_name(name)] = converted
    return out


def llama_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict:
    """`config.json` of a LlamaForCausalLM with our shapes and RoPE settings, as plain JSON.

    `rope_theta` is the effective base (`rope_base` times `rope_base_scaling`); a base change (ABF) needs
    nothing else. `rope_scaling` is None for plain RoPE, the "linear" type for position interpolation
    (positions divided by the factor), or the "yarn" type with its factor, the pretraining window as
    `original_max_position_embeddings` and both betas; the attention factor only when set, as transformers
    derives the same default (0.1 ln(factor) + 1). YaRN's correction range is rounded outwards, transformers'
    default too, so `truncate` is left out for readers that predate it. The factor is always
    `max_position_embeddings / original_max_position_embeddings` (`ModelConfig` refuses any other), the value
    transformers 4.51-4.55 derive in its place, so every transformers from 4.51 on rotates as we do.
    """
    scaling = None
    if cfg.rope_scaling != 1.0 and cfg.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_scaling}
    elif cfg.rope_scaling != 1.0:
        scaling = {
            "rope_type": "yarn",
            "factor": float(cfg.rope_scaling),
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": float(cfg.yarn_beta_fast),
            "beta_slow": float(cfg.yarn_beta_slow),
        }
        if cfg.yarn_attention_factor is not None:
            scaling["attention_factor"] = float(cfg.yarn_attention_factor)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }
    return config


def mistral_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict:
    """`config.json` of a MistralForCausalLM: the Llama config (same weights, RoPE and norms) with the sliding
    window, whose meaning is ours (W keys, the query's own included, in every layer). Mistral has no bias
    switches, so Llama's are left out."""
    config = llama_config(cfg, bos_id, eos_id, pad_id, dtype)
    for key in ("attention_bias", "mlp_bias"):
        del config[key]
    config.update(
        architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=cfg.sliding_window
    )
    return config


def mixtral_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict:
    """`config.json` of a MixtralForCausalLM: Mistral's (window or null) with every layer an MoE layer of
    `num_local_experts` experts of width `intermediate_size`, `num_experts_per_tok` per token. Mixtral has no
    dense layers, so an MoE model with `every_n_layers` > 1 is refused. transformers' router loss counts per
    token what ours counts per assignment (top_k times ours), so its coefficient is ours / top_k."""
    moe = cfg.moe
    if moe.every_n_layers != 1:
        raise ExportError(
            f"model.moe.every_n_layers={moe.every_n_layers}: a MixtralForCausalLM has experts in every layer, "
            "so a model with dense layers between its MoE layers has no transformers equivalent to export to"
        )
    config = mistral_config(cfg, bos_id, eos_id, pad_id, dtype)
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=cfg.expert_ffn_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.load_balance_coef / moe.top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    return config


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict:
    """The exported `config.json`: Mixtral's for an MoE model, Mistral's for a windowed one, else Llama's."""
    if cfg.moe.enabled:
        return mixtral_config(cfg, bos_id, eos_id, pad_id, dtype)
    make = llama_config if cfg.sliding_window is None else mistral_config
    return make(cfg, bos_id, eos_id, pad_id, dtype)


def generation_config(bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}


def mixtral_hub_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory Mixtral names (`mlp.gate`, fused `mlp.experts.gate_up_proj` [E, 2F, D] and
    `down_proj` [E, D, F]) as the files Mixtral is published in, which every Mixtral reader loads (transformers 4
    and 5, vLLM): `block_sparse_moe.gate.weight` and per expert e `block_sparse_moe.experts.e.w1.weight` (gate
    rows), `w3` (up rows) and `w2` (down)."""
    out = {}
    for name, tensor in tensors.items():
        if ".mlp.experts." in name or ".mlp.gate." in name:
            prefix = name.split(".mlp.")[0] + ".block_sparse_moe."
            if name.endswith(".mlp.gate.weight"):
                out[prefix + "gate.weight"] = tensor
            elif name.endswith("gate_up_proj"):
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"{prefix}experts.{e}.w1.weight"] = gate[e].clone()
                    out[f"{prefix}experts.{e}.w3.weight"] = up[e].clone()
            elif name.endswith("down_proj"):
                for e in range(tensor.shape[0]):
                    out[f"{prefix}experts.{e}.w2.weight"] = tensor[e].clone()
            else:
                raise ExportError(f"no Mixtral file name for {name!r}")
        else:
            out[name] = tensor
    return out


def write_hf_model(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    dtype: str = "fp32",
    add_bos: bool = True,
) -> Path:
    """Write `state` (our names, as `Transformer.state_dict()` or the consolidation gives) as an HF model dir.

    `add_bos` is the run's `data.add_bos`: whether its documents started with BOS, so that the exported
    tokenizer encodes text the way training did. Everything goes to a temporary sibling directory first and is
    renamed into place, so `out_dir` is either the previous export or the complete new one, never a
    half-written mix.
    """
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype_name(dtype, "dtype")]
    hf_dtype = str(torch_dtype).removeprefix("torch.")
    check_state_dict(state, cfg)
    _, info = load_tokenizer(tokenizer_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = hf_state_dict(state, cfg, torch_dtype)
        if cfg.moe.enabled:
            tensors = mixtral_hub_layout(tensors)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ids = (info.bos_id, info.eos_id, info.pad_id)
        atomic_write_json(tmp / "config.json", hf_config(cfg, *ids, dtype=hf_dtype))
        atomic_write_json(tmp / "generation_config.json", generation_config(*ids))
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if not source.is_file():
                raise ExportError(f"tokenizer file {source} is missing; re-run `python -m data.tokenizer`")
            shutil.copyfile(source, tmp / name)
        _encode_as_training(tmp, info.bos_id, add_bos)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _encode_as_training(directory: Path, bos_id: int, add_bos: bool) -> None:
    """Make `AutoTokenizer(text)` encode text as training documents were: a special token's spelling in the
    text stays text (`split_special_tokens`), and with `add_bos` the ids start with BOS, through a
    post-processor in tokenizer.json (what transformers applies to a PreTrainedTokenizerFast) and the same
    choice as add_bos_token/add_eos_token in tokenizer_config.json for tools that read those flags instead."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(split_special_tokens=True)
    if add_bos:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        bos = tokenizer.id_to_token(bos_id)
        tokenizer.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        atomic_write_text(directory / "tokenizer.json", tokenizer.to_str(pretty=True))
        config.update(add_bos_token=True, add_eos_token=False)
    atomic_write_json(directory / "tokenizer_config.json", config)


@dataclass
class ExportConfig:
    """`python -m pretrain.export`: which run (or checkpoint) to export, where, and in which dtype."""

    # A run directory (its newest usable committed checkpoint) or one checkpoint directory.
    run: str = MISSING
    # Output directory; default runs/<name>/hf/<checkpoint tag>.
    out: str | None = None
    # Dtype of the saved weights: fp32, bf16 or fp16 (float32, bfloat16, float16 also accepted).
    dtype: str = "fp32"
    log_level: str = "INFO"

    def validate(self) -> None:
        self.dtype = dtype_name(self.dtype, "dtype")


def export(path: str | Path, out: str | Path | None = None, dtype: str = "fp32") -> Path:
    """Export the newest usable checkpoint of a run (or the given checkpoint); returns the directory written.

    The weights go with the config that checkpoint was trained with. The default destination is
    `runs/<name>/hf/<step tag>/`.
    """
    checkpoint, state = newest_weights(path)
    cfg = checkpoint.config()
    out_dir = Path(out) if out is not None else checkpoint.run_dir / "hf" / checkpoint.tag
    written = write_hf_model(out_dir, state, cfg.model, cfg.tokenizer.dir, dtype, cfg.data.add_bos)
    log.info("exported %s (step %d) to %s as %s", checkpoint.path, checkpoint.step, written, dtype)
    return written


def _run(config: ExportConfig) -> Path:
    written = export(config.run, config.out, config.dtype)
    sys.stdout.write(f"{written}\n")
    return written


main = hydra_command("export", ExportConfig, _run)
