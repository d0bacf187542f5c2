"""How a global batch of tokens is cut: sequences, sequences per rank, micro-batches and accumulation steps.

Plain arithmetic with one check, shared by the engine (DeepSpeed's batch sizes), the trainer (what the loader
reads and how it is split) and the planner. A run computes the layout of every size its batch schedule passes
through once, at start, so a size that does not divide fails before the first step, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.config import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """One global batch: `sequences` of `seq_len`, `per_rank` on each of `world_size` ranks, fed as
    `accumulation` micro-batches of `micro_batch` sequences."""

    tokens: int
    seq_len: int
    micro_batch: int
    world_size: int

    @property
    def sequences(self) -> int:
        return self.tokens // self.seq_len

    @property
    def per_rank(self) -> int:
        return self.sequences // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch


def batch_layout(tokens: int, seq_len: int, micro_batch: int, world_size: int, key: str) -> BatchLayout:
    """The layout of a global batch of `tokens`, or a ConfigError naming `key` when it does not divide."""
    if tokens % seq_len:
        raise ConfigError(f"{key}: {tokens} is not a multiple of data.packing.seq_len={seq_len}")
    sequences = tokens // seq_len
    per_step = micro_batch * world_size
    if sequences % per_step:
        raise ConfigError(
            f"{key}: {sequences} sequences per global batch do not divide into train.micro_batch_size="
            f"{micro_batch} x world size {world_size}; make the batch a multiple of {per_step * seq_len} tokens"
        )
    return BatchLayout(tokens, seq_len, micro_batch, world_size)


def schedule_layouts(
    sizes: list[int], seq_len: int, micro_batch: int, world_size: int
) -> dict[int, BatchLayout]:
    """The layout of every batch size (tokens) a run's schedule passes through, each checked."""
    first = sizes[0] if len(sizes) > 1 else None
    layouts = {}
    for size in sizes:
        key = "train.start_batch_tokens" if size == first else "train.global_batch_tokens"
        layouts[size] = batch_layout(size, seq_len, micro_batch, world_size, key)
    return layouts
