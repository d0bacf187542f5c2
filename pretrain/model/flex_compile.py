"""Compiled FlexAttention that never falls back to eager without saying so.

Eager FlexAttention (and an eager `create_block_mask`) materialises the whole [B, H, T, S] score matrix, which
at long sequences is out of memory. `torch.compile(fn, dynamic=False)` compiles once per input shape, and once
Dynamo has compiled a function `recompile_limit` times (8 by default) it quietly runs every further shape
eagerly: a few extra shapes (an evaluation's tail batches, a new sequence length) turn the fast kernel into the
materialising one with nothing but a log line. Two things keep that from happening:

* `pad_batch` rounds a batch up to the largest batch already seen at the same sequence length, so the short
  tail batches of an evaluation reuse the full batch's compiled kernel instead of adding shapes;
* `ShapeBoundedCompile` counts the distinct shapes it has compiled for and raises, naming what to change,
  before Dynamo's limit is reached.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

# Distinct shapes one compiled function may see; kept below Dynamo's own recompile limit (see `shape_budget`).
DEFAULT_SHAPE_BUDGET = 6


def shape_budget() -> int:
    """How many shapes a compiled function may take before Dynamo's recompile limit would make it run eagerly."""
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8)
    return max(1, min(DEFAULT_SHAPE_BUDGET, int(limit) - 1))


def shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """What Dynamo specialises on with dynamic=False: the grad mode, every tensor's shape, dtype and
    requires_grad, every plain int (so a forward under no_grad after training counts as its own entry)."""
    parts: list[Hashable] = [torch.is_grad_enabled()]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            parts.append((tuple(value.shape), value.dtype, value.requires_grad))
        elif isinstance(value, int | bool | str | type(None)):
            parts.append(value)
        elif hasattr(value, "shape"):  # a BlockMask: its (B, H, Q_LEN, KV_LEN)
            parts.append(tuple(value.shape))
    return tuple(parts)


class ShapeBoundedCompile:
    """`torch.compile(fn, dynamic=False)`, refusing a new input shape once `budget` shapes were compiled.

    The refusal is an error rather than Dynamo's silent eager fallback, which for FlexAttention means building
    the full score matrix (out of memory at long sequences, or just much slower).
    """

    def __init__(self, fn: Callable[..., Any], budget: int | None = None, compile_fn: Callable | None = None):
        self.name = getattr(fn, "__name__", repr(fn))
        self.budget = budget if budget is not None else shape_budget()
        self.compiled = (compile_fn or torch.compile)(fn, dynamic=False)
        self.shapes: list[Hashable] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = shape_key(args, kwargs)
        if key not in self.shapes:
            if len(self.shapes) >= self.budget:
                raise RuntimeError(
                    f"compiled {self.name} has already been compiled for {len(self.shapes)} input shapes "
                    f"(budget {self.budget}, below torch._dynamo.config.recompile_limit); one more would make "
                    f"it run eagerly and materialise the full attention matrix. New shape: {key}; seen: "
                    f"{self.shapes}. Keep batch shapes fixed (same train.micro_batch_size and "
                    "data.packing.seq_len for every batch), or set model.attention=sdpa for this run"
                )
            self.shapes.append(key)
        return self.compiled(*args, **kwargs)


class BatchPadding:
    """The largest batch seen per sequence length, so smaller (tail) batches can be padded up to it."""

    def __init__(self) -> None:
        self.largest: dict[Hashable, int] = {}

    def pad_batch(self, batch: int, key: Hashable) -> int:
        """The batch size to run: `batch`, or the largest one already run for `key` when that is larger."""
        largest = max(batch, self.largest.get(key, 0))
        self.largest[key] = largest
        return largest


def pad_rows(x: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    """`x` with its first dimension extended to `rows` by rows filled with `value` (unchanged when it has them)."""
    missing = rows - x.shape[0]
    if missing <= 0:
        return x
    return torch.cat([x, x.new_full((missing, *x.shape[1:]), value)])
