"""Checkpoints and the run directory, in one package: where a run's files live and which checkpoints count
(`run_dir`), reading a checkpoint's weights (`weights`), and saving and resuming on every rank (`manager`)."""

from pretrain.checkpoint.manager import CheckpointManager, rng_state, set_rng_state
from pretrain.checkpoint.run_dir import (
    BROKEN_DIR,
    CONFIG_FILE,
    DEEPSPEED_FILE,
    MARKER,
    STATE_FILE,
    SUMMARY_FILE,
    Checkpoint,
    CheckpointError,
    RunDir,
    checkpoint_problem,
    checkpoint_world_size,
    config_yaml,
    find_checkpoint,
    read_config,
    rng_file,
    tag_for,
    usable_checkpoints,
)
from pretrain.checkpoint.weights import (
    check_state_dict,
    consolidate,
    load_trained,
    model_from_state,
    newest_weights,
)

__all__ = [
    "BROKEN_DIR",
    "CONFIG_FILE",
    "DEEPSPEED_FILE",
    "MARKER",
    "STATE_FILE",
    "SUMMARY_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "RunDir",
    "check_state_dict",
    "checkpoint_problem",
    "checkpoint_world_size",
    "config_yaml",
    "consolidate",
    "find_checkpoint",
    "load_trained",
    "model_from_state",
    "newest_weights",
    "read_config",
    "rng_file",
    "rng_state",
    "set_rng_state",
    "tag_for",
    "usable_checkpoints",
]
