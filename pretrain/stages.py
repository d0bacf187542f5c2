"""Stages: a run that starts from another run's checkpoint (continued pretraining, annealing, long context).

`train.init_from=runs/<parent>` (or one of its checkpoint directories) takes the parent's weights into this
run's ZeRO-3 engine, at any world size (a checkpoint of another world size goes through its universal copy,
`pretrain.reshard`). The fp32 master weights come over at full precision. By default the optimizer starts
fresh (zero AdamW moments, step 0) and the stage has its own token schedule, data position and RNG;
`train.init_optimizer=true` continues the parent's moments as an annealing stage does. The stage records its
parent in `runs/<stage>/parent.json` (run, checkpoint, step, tokens, and the parent's whole config).

Only the first start of a stage reads the parent: once the stage has a committed checkpoint, a restart resumes
the stage like any run. A parent with other RoPE settings, another context length or other data is the normal
case; one with another architecture or another tokenizer cannot continue into this run and fails with the
difference named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data.log import get_logger
from data.tokenizer import TokenizerError, TokenizerInfo, load_tokenizer
from pretrain.checkpoint import Checkpoint, CheckpointManager, RunDir, find_checkpoint
from pretrain.config import ConfigError, ModelConfig, PretrainConfig

log = get_logger(__name__)

PARENT_FILE = "parent.json"
# Model keys that shape the weights: a stage must keep them. Everything else (RoPE, context length, attention
# kernel, loss chunking) may change between stages.
ARCHITECTURE_KEYS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "kv_heads",
    "ffn_dim",
    "tie_embeddings",
    "norm_eps",
)


def architecture_differences(parent: ModelConfig, child: ModelConfig) -> list[str]:
    """`model.<key>: parent X, this run Y` for every weight-shaping key that differs."""
    return [
        f"model.{key}: parent {getattr(parent, key)}, this run {getattr(child, key)}"
        for key in ARCHITECTURE_KEYS
        if getattr(parent, key) != getattr(child, key)
    ]


def check_compatible(
    parent: Checkpoint, parent_cfg: PretrainConfig, cfg: PretrainConfig, tok: TokenizerInfo
) -> None:
    """Fail naming the difference when the parent's weights cannot continue into this run."""
    problems = architecture_differences(parent_cfg.model, cfg.model)
    try:
        parent_fingerprint = load_tokenizer(parent_cfg.tokenizer.dir)[1].fingerprint
    except (TokenizerError, OSError):
        parent_fingerprint = None
    if parent_fingerprint is None:
        problems.append(
            f"tokenizer: the parent's tokenizer {parent_cfg.tokenizer.dir} cannot be read, so its token ids "
            "cannot be checked against this run's"
        )
    elif parent_fingerprint != tok.fingerprint:
        problems.append(
            f"tokenizer: parent {parent_cfg.tokenizer.dir} (fingerprint {parent_fingerprint[:12]}), this run "
            f"{tok.dir} (fingerprint {tok.fingerprint[:12]}): the token ids mean different things"
        )
    if problems:
        raise ConfigError(
            f"train.init_from: {parent.path} cannot start this run: "
            + "; ".join(problems)
            + ". A stage keeps its parent's architecture and tokenizer; set these keys as the parent has them"
        )


def parent_to_start_from(cfg: PretrainConfig, tok: TokenizerInfo) -> Checkpoint | None:
    """The parent checkpoint this start must initialise from (checked against this run), or None when there
    is no parent or the stage already has checkpoints of its own and resumes from them."""
    if not cfg.train.init_from or RunDir(Path(cfg.run_dir)).committed():
        return None
    parent = find_checkpoint(cfg.train.init_from)
    check_compatible(parent, parent.config(), cfg, tok)
    return parent


def start_from_parent(
    cfg: PretrainConfig, parent: Checkpoint, engine: Any, manager: CheckpointManager, is_main: bool
) -> dict[str, Any]:
    """Load the parent's weights (and optionally its optimizer moments) into `engine`; returns the record
    written to parent.json."""
    parent_cfg = parent.config()
    problem = manager.load_engine_state(engine, parent.path, copy_name=f"parent-{parent.tag}")
    if not manager.all_ranks_ok(problem is None):
        raise RuntimeError(
            f"train.init_from: could not load {parent.path}: {problem or 'the load failed on another rank'}"
        )
    engine.restart_optimizer(keep_moments=cfg.train.init_optimizer)
    state = parent.state
    record = {
        "run": str(parent.run_dir.resolve()),
        "checkpoint": str(parent.path.resolve()),
        "step": state["step"],
        "tokens": state["tokens"],
        "init_optimizer": cfg.train.init_optimizer,
        "world_size": parent.world_size,
        "config": dataclasses.asdict(parent_cfg),
    }
    if is_main:
        RunDir(Path(cfg.run_dir)).write_json(PARENT_FILE, record)
        log.info(
            "stage %s starts from %s (step %d, %d tokens) with %s",
            cfg.train.run_name,
            parent.path,
            state["step"],
            state["tokens"],
            "its optimizer moments" if cfg.train.init_optimizer else "a fresh optimizer",
        )
    return record
