"""Stages: a run that starts from another run's checkpoint (continued pretraining, annealing, long context).

`train.init_from=runs/<parent>` (or one of its checkpoint directories) takes the parent's weights into this
run's ZeRO-3 engine, at any world size (a checkpoint of another world size goes through its universal copy,
`pretrain.checkpoint.reshard`). The fp32 master weights come over at full precision. By default the optimizer starts
fresh (zero AdamW moments, step 0) and the stage has its own token schedule and RNG;
`train.init_optimizer=true` continues the parent's moments as an annealing stage does. The stage records its
parent in `runs/<stage>/parent.json` (run, checkpoint, step, tokens, tokenizer, data start, the parent's config).

The data either starts fresh at sample 0 or continues exactly where the parent stopped
(`train.init_data_position`): the sample order is a function of the dataset fingerprint alone (not of
`train.total_tokens`), so a stage whose fingerprint equals the one in the parent's loader state reads, from the
parent's position on, the samples an uninterrupted parent would have read next.

The tokenizer is checked against the fingerprint the parent's checkpoint recorded when it was written, not
against whatever is in the parent's tokenizer directory now: a tokenizer retrained in place keeps its directory
but changes its ids.

Only the first start of a stage reads the parent: once the stage has a committed checkpoint, a restart resumes
the stage like any run. A parent with other RoPE settings, another context length or other data is the normal
case; one with another architecture or another tokenizer cannot continue into this run and fails with the
difference named.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
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
    "moe.num_experts",
    "expert_ffn_dim",
    "moe.every_n_layers",
)


def architecture_differences(parent: ModelConfig, child: ModelConfig) -> list[str]:
    """`model.<key>: parent X, this run Y` for every weight-shaping key that differs."""
    differences = []
    for key in ARCHITECTURE_KEYS:
        read = operator.attrgetter(key)  # dotted for the nested MoE keys
        if read(parent) != read(child):
            differences.append(f"model.{key}: parent {read(parent)}, this run {read(child)}")
    return differences


def tokenizer_record(tok: TokenizerInfo) -> dict[str, Any]:
    """What a checkpoint records of the tokenizer it was trained with (the trainer state's `tokenizer`)."""
    return {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}


def parent_tokenizer(parent: Checkpoint, parent_cfg: PretrainConfig) -> tuple[str | None, str]:
    """The parent's tokenizer fingerprint and where it comes from: its checkpoint's record, or (for a checkpoint
    written before checkpoints recorded it) the tokenizer in the parent's directory now, with a warning."""
    recorded = parent.state.get("tokenizer") or {}
    if recorded.get("fingerprint"):
        return recorded["fingerprint"], f"vocab {recorded.get('vocab_size')}, recorded in {parent.path}"
    log.warning(
        "%s does not record the tokenizer it was trained with (written by an older version): checking the "
        "tokenizer in the parent's directory %s as it is now, which cannot tell a tokenizer retrained in place",
        parent.path,
        parent_cfg.tokenizer.dir,
    )
    try:
        info = load_tokenizer(parent_cfg.tokenizer.dir)[1]
    except (TokenizerError, OSError):
        return None, parent_cfg.tokenizer.dir
    return info.fingerprint, f"vocab {info.vocab_size}, read from {info.dir} now"


def check_compatible(
    parent: Checkpoint, parent_cfg: PretrainConfig, cfg: PretrainConfig, tok: TokenizerInfo
) -> None:
    """Fail naming the difference when the parent's weights cannot continue into this run."""
    problems = architecture_differences(parent_cfg.model, cfg.model)
    parent_fingerprint, origin = parent_tokenizer(parent, parent_cfg)
    if parent_fingerprint is None:
        problems.append(
            f"tokenizer: the parent's checkpoint records no tokenizer and its tokenizer {origin} cannot be read, "
            "so its token ids cannot be checked against this run's"
        )
    elif parent_fingerprint != tok.fingerprint:
        problems.append(
            f"tokenizer: parent trained with fingerprint {parent_fingerprint[:12]} ({origin}), this run's "
            f"{tok.dir} has fingerprint {tok.fingerprint[:12]} (vocab {tok.vocab_size}): the token ids mean "
            "different things (a tokenizer retrained in place keeps its directory, not its ids)"
        )
    if problems:
        raise ConfigError(
            f"train.init_from: {parent.path} cannot start this run: "
            + "; ".join(problems)
            + ". A stage keeps its parent's architecture and tokenizer; set these keys as the parent has them"
        )


@dataclass(frozen=True)
class DataStart:
    """Where a stage's data starts: `continue` at the parent's next sample, or `fresh` at sample 0."""

    mode: str
    position: int
    reason: str
    parent_loader: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "position": self.position, "reason": self.reason}


def choose_data_start(cfg: PretrainConfig, parent: Checkpoint, dataset_fingerprint: str) -> DataStart:
    """Resolve `train.init_data_position` against the parent's loader state (its position and the fingerprint
    of the sample order it read); `continue` with another order is an error, since it could not be exact."""
    wanted = cfg.train.init_data_position
    loader = parent.state.get("loader") or {}
    parent_fingerprint = loader.get("dataset_fingerprint")
    position = int(loader.get("position", 0))
    same = parent_fingerprint is not None and parent_fingerprint == dataset_fingerprint
    differs = (
        f"this stage's sample order (dataset fingerprint {dataset_fingerprint[:12]}) differs from the parent's "
        f"({(parent_fingerprint or 'not recorded')[:12]}): sources, weights, data.seed, packing, seq_len, "
        "tokenizer or shards changed"
    )
    if wanted == "fresh":
        return DataStart("fresh", 0, "train.init_data_position=fresh", loader)
    if wanted == "continue" and not same:
        raise ConfigError(
            f"train.init_data_position=continue: {differs}, so the stage cannot read the samples the parent "
            "would have read next. Use the parent's data config, or set train.init_data_position=fresh (or auto)"
        )
    if same:
        return DataStart(
            "continue",
            position,
            f"train.init_data_position={wanted}: the stage's data is the parent's",
            loader,
        )
    return DataStart("fresh", 0, f"train.init_data_position=auto: {differs}", loader)


def parent_to_start_from(cfg: PretrainConfig, tok: TokenizerInfo) -> Checkpoint | None:
    """The parent checkpoint this start must initialise from (checked against this run), or None when there
    is no parent or the stage already has checkpoints of its own and resumes from them."""
    if not cfg.train.init_from or RunDir(Path(cfg.run_dir)).committed():
        return None
    parent = find_checkpoint(cfg.train.init_from)
    check_compatible(parent, parent.config(), cfg, tok)
    return parent


def start_from_parent(
    cfg: PretrainConfig,
    parent: Checkpoint,
    engine: Any,
    manager: CheckpointManager,
    is_main: bool,
    data_start: DataStart,
) -> dict[str, Any]:
    """Load the parent's weights (and optionally its optimizer moments) into `engine`; returns the record
    written to parent.json (the caller moves the loader to `data_start`)."""
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
        "target_tokens": state.get("target_tokens"),
        "init_optimizer": cfg.train.init_optimizer,
        "world_size": parent.world_size,
        "tokenizer": state.get("tokenizer"),
        "data": data_start.record(),
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
        log.info("stage data: %s at sample %d (%s)", data_start.mode, data_start.position, data_start.reason)
    return record
