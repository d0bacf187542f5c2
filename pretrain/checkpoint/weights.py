"""Reading a checkpoint's weights without a process group: consolidated fp32 weights in our own Transformer.

The ZeRO shards are merged on CPU by DeepSpeed's own `zero_to_fp32`. For a run directory, a checkpoint that
fails to consolidate is skipped, with a warning, for the previous one, as the trainer's resume does. Our own
loads use `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from data.log import get_logger
from pretrain.checkpoint.run_dir import (
    Checkpoint,
    CheckpointError,
    RunDir,
    find_checkpoint,
    usable_checkpoints,
)
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.model.transformer import Transformer

log = get_logger(__name__)

AUTOEP_LAYERS = "ds_autoep_layers"  # the key AutoEP adds to DeepSpeed's model states


def consolidate(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every rank's ZeRO shards as one state dict on CPU (DeepSpeed's utility);
    a checkpoint with expert-parallel (AutoEP) layers goes through its universal copy instead."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.info("consolidating %s", checkpoint.path)
    try:
        if has_expert_parallel_layers(checkpoint.path):
            return from_universal_copy(checkpoint)
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays for our results
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    except Exception as err:
        raise CheckpointError(
            f"DeepSpeed could not consolidate {checkpoint.path}: {type(err).__name__}: {err}. Export reads ZeRO "
            "stage 1-3 checkpoints written by `python -m pretrain`; an older committed checkpoint may still work"
        ) from err
    return dict(state)


def has_expert_parallel_layers(checkpoint_dir: Path, missing_ok: bool = True) -> bool:
    """Whether DeepSpeed AutoEP wrote the checkpoint (its model states list the expert-parallel layers); a
    checkpoint without model states is not one, or with `missing_ok=False` an error."""
    states = sorted(Path(checkpoint_dir).glob("*model_states.pt"))
    if not states:
        if not missing_ok:
            raise FileNotFoundError(f"no model states in {checkpoint_dir}")
        return False
    return bool(torch.load(states[0], map_location="cpu", weights_only=False).get(AUTOEP_LAYERS, []))


def from_universal_copy(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint's universal copy (`pretrain.checkpoint.reshard`, converted now if there
    is none). `zero_to_fp32` refuses AutoEP checkpoints, whose experts are partitioned over expert groups;
    DeepSpeed's universal conversion writes each whole. AutoEP's names map back to ours: `router.gate.weight`
    is `router.weight`, and `experts.w1` (gate rows) and `experts.w3` (up rows) stack into `gate_up_proj`,
    `experts.w2` is `down_proj`."""
    from pretrain.checkpoint.reshard import convert

    universal, _, _ = convert(checkpoint.run_dir, checkpoint.path)
    found: dict[str, torch.Tensor] = {}
    for fp32 in sorted((universal / "zero").glob("*/fp32.pt")):
        saved = torch.load(fp32, map_location="cpu", weights_only=True)
        # Experts are saved whole ({"param": [E, ...], ...}); the other parameters flat, shaped below.
        found[fp32.parent.name] = saved["param"] if isinstance(saved, dict) else saved
    state: dict[str, torch.Tensor] = {}
    for name, tensor in found.items():
        if name.endswith(".router.gate.weight"):
            state[name.removesuffix("gate.weight") + "weight"] = tensor
        elif name.endswith(".experts.w1"):
            up = found[name.removesuffix("w1") + "w3"]
            state[name.removesuffix("w1") + "gate_up_proj"] = torch.cat([tensor, up], dim=1)
        elif name.endswith(".experts.w2"):
            state[name.removesuffix("w2") + "down_proj"] = tensor
        elif not name.endswith(".experts.w3"):
            state[name] = tensor
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(checkpoint.config().model).state_dict().items()}
    return {name: t.view(shapes[name]) if name in shapes else t for name, t in state.items()}


def newest_weights(path: str | Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The consolidated weights of `path` (see `find_checkpoint`). For a run directory a checkpoint that fails
    to consolidate is skipped, with a warning, for the previous one, as the trainer's resume does."""
    path = Path(path)
    if not RunDir(path).is_run():
        checkpoint = find_checkpoint(path)
        return checkpoint, consolidate(checkpoint)
    find_checkpoint(path)  # the clear error when there is none at all
    last_error: CheckpointError | None = None
    for checkpoint in usable_checkpoints(RunDir(path)):
        try:
            return checkpoint, consolidate(checkpoint)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            last_error = err
    assert last_error is not None
    raise last_error


def check_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Fail with the differing names and shapes when the weights do not fit the model config."""
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
        raise CheckpointError(
            f"the checkpoint's weights do not match the model config ({cfg.name}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes}; was its config.yaml edited after training?"
        )


def model_from_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Transformer:
    """Our Transformer holding `state` (checked against `cfg` first), on CPU, in eval mode."""
    check_state_dict(state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_trained(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, PretrainConfig, Checkpoint]:
    """The trained model of a run or checkpoint (eval mode), the config it was trained with, and which
    checkpoint was read."""
    checkpoint, state = newest_weights(path)
    cfg = checkpoint.config()
    model = model_from_state(state, cfg.model).to(device=device, dtype=dtype)
    log.info("loaded %s (step %d)", checkpoint.path, checkpoint.step)
    return model, cfg, checkpoint
