"""A trained checkpoint as a Hugging Face Llama directory: `python -m pretrain.export <run or checkpoint>`.

The ZeRO-3 shards are consolidated on CPU into one fp32 state dict by DeepSpeed's own `zero_to_fp32` (no process
group, no GPU), renamed to Hugging Face's Llama names and written as `model.safetensors` next to a `config.json`,
a `generation_config.json` and the run's tokenizer files. `transformers.LlamaForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` then load it, and so does anything built on them (lm-evaluation-harness,
vLLM). The config is written as plain JSON so that exporting never needs transformers installed.

`load_model` gives the same consolidated weights in our own `pretrain.model.Transformer`, for evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data.config import ConfigError
from data.log import get_logger, setup_logging
from data.tokenizer import TokenizerError, load_tokenizer
from pretrain.app import load_run_config
from pretrain.checkpoint import MARKER, STATE_FILE
from pretrain.config import PretrainConfig
from pretrain.model import ModelConfig, Transformer

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Our parameter names -> Hugging Face Llama's (inside `model.`); the rest of each name is the same.
_LAYER_RENAMES = (
    ("attn_norm.", "input_layernorm."),
    ("attn.", "self_attn."),
    ("mlp_norm.", "post_attention_layernorm."),
    ("mlp.", "mlp."),
)
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


class ExportError(RuntimeError):
    """A checkpoint or run directory that cannot be exported, with what to do about it."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint and the run it belongs to."""

    run_dir: Path
    path: Path

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return int(json.loads((self.path / STATE_FILE).read_text())["step"])


def committed_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's committed checkpoints, oldest first; reading only, so no ranks and no barrier are involved."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def find_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest committed checkpoint) or one checkpoint directory (which must be committed)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(
            f"{path} is not a directory; pass a run directory (runs/<name>) or one of its checkpoints"
        )
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        done = committed_checkpoints(path)
        if not done:
            raise ExportError(
                f"{path} has no committed checkpoint under {path / 'checkpoints'}; train longer or wait for the "
                f"first save (train.checkpoint_every_steps)"
            )
        return Checkpoint(run_dir=path, path=done[-1])
    if not (path / MARKER).is_file():
        raise ExportError(
            f"checkpoint {path} is not committed (no {MARKER} marker): its save was interrupted or is still "
            f"running, so its shards may be incomplete. Pass the run directory ({path.parent.parent}) to use the "
            f"newest committed checkpoint"
        )
    return Checkpoint(run_dir=path.parent.parent, path=path)


def consolidate(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every rank's ZeRO shards as one state dict on CPU (DeepSpeed's utility)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.info("consolidating %s", checkpoint.path)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays for our results
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    except Exception as err:
        raise ExportError(
            f"DeepSpeed could not consolidate {checkpoint.path}: {type(err).__name__}: {err}. Export reads ZeRO "
            f"stage 1-3 checkpoints written by `python -m pretrain`; an older committed checkpoint may still work"
        ) from err
    return dict(state)


def check_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Fail with the differing names and shapes when the weights do not fit the run's model config."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    got = {name: tuple(t.shape) for name, t in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or unexpected or wrong:
        shapes = [f"{n}: {got[n]} != {expected[n]}" for n in wrong[:5]]
        raise ExportError(
            f"the checkpoint's weights do not match the run's model config ({cfg.name}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes}; was config.yaml edited after training?"
        )


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

    RoPE base scaling is folded into `rope_theta`; position interpolation is Llama's "linear" rope scaling
    (positions divided by the factor), the same rotation our model applies.
    """
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
        "rope_theta": cfg.rope_base * cfg.rope_base_scaling,
        "rope_scaling": (
            {"rope_type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else None
        ),
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


def generation_config(bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place; an older export at `target` is removed only after the swap."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_hf_model(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    dtype: str = "float32",
) -> Path:
    """Write `state` (our names, as `Transformer.state_dict()` or the consolidation gives) as an HF Llama dir.

    Everything goes to a temporary sibling directory first and is renamed into place, so `out_dir` is either the
    previous export or the complete new one, never a half-written mix.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_state_dict(state, cfg)
    _, info = load_tokenizer(tokenizer_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = hf_state_dict(state, cfg, DTYPES[dtype])
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ids = (info.bos_id, info.eos_id, info.pad_id)
        _write_json(tmp / "config.json", llama_config(cfg, *ids, dtype=dtype))
        _write_json(tmp / "generation_config.json", generation_config(*ids))
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if not source.is_file():
                raise ExportError(f"tokenizer file {source} is missing; re-run `python -m data.tokenizer`")
            shutil.copyfile(source, tmp / name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run_config(checkpoint: Checkpoint) -> PretrainConfig:
    """The config the checkpoint's run was trained with (`runs/<name>/config.yaml`)."""
    return load_run_config(checkpoint.run_dir)


def load_model(
    checkpoint: Checkpoint, cfg: PretrainConfig, device: torch.device | str = "cpu"
) -> Transformer:
    """Our Transformer with the checkpoint's consolidated fp32 weights, in eval mode, on `device`."""
    state = consolidate(checkpoint)
    check_state_dict(state, cfg.model)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def export(path: str | Path, out: str | Path | None = None, dtype: str = "float32") -> Path:
    """Export the newest committed checkpoint of a run (or the given checkpoint); returns the directory written.

    The default destination is `runs/<name>/hf/<step tag>/`.
    """
    checkpoint = find_checkpoint(path)
    cfg = run_config(checkpoint)
    state = consolidate(checkpoint)
    out_dir = Path(out) if out is not None else checkpoint.run_dir / "hf" / checkpoint.tag
    written = write_hf_model(out_dir, state, cfg.model, cfg.tokenizer.dir, dtype)
    log.info("exported %s (step %d) to %s as %s", checkpoint.path, checkpoint.step, written, dtype)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Write a checkpoint as a Hugging Face Llama directory (safetensors, config, tokenizer).",
    )
    parser.add_argument(
        "path", help="a run directory (newest committed checkpoint) or one checkpoint directory"
    )
    parser.add_argument("--out", default=None, help="output directory (default: <run>/hf/<checkpoint tag>)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        written = export(args.path, args.out, args.dtype)
    except (ExportError, ConfigError, TokenizerError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    sys.stdout.write(f"{written}\n")


if __name__ == "__main__":
    main()
