"""Learning-rate and batch-size schedules as functions of tokens consumed, and the cadence of periodic jobs in steps.

Because both are functions of tokens, not steps, growing the batch does not shift the LR curve, and a
resumed run needs nothing but the token count to be back on both curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `peak` over `warmup_tokens`, then cosine decay to `min_ratio * peak` at `total_tokens`."""

    peak: float
    warmup_tokens: int
    total_tokens: int
    min_ratio: float = 0.1

    def __call__(self, tokens: int) -> float:
        floor = self.peak * self.min_ratio
        if self.warmup_tokens > 0 and tokens < self.warmup_tokens:
            return self.peak * tokens / self.warmup_tokens
        decay_span = max(1, self.total_tokens - self.warmup_tokens)
        progress = min(1.0, max(0.0, (tokens - self.warmup_tokens) / decay_span))
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch in tokens: `start` growing in integer multiples of itself to `final` over `ramp_tokens`.

    With k = final / start, the batch is m * start where m = 1 + floor(tokens * (k - 1) / ramp_tokens), capped at
    k: each multiple is in force for ramp_tokens / (k - 1) tokens. `start == 0` means no growth.
    """

    final: int
    start: int = 0
    ramp_tokens: int = 0

    def __post_init__(self) -> None:
        if self.start and self.final % self.start:
            raise ValueError(
                f"final batch {self.final} is not an integer multiple of start batch {self.start}"
            )

    def __call__(self, tokens: int) -> int:
        if not self.start or self.start == self.final:
            return self.final
        multiple = self.final // self.start
        if self.ramp_tokens <= 0:
            return self.final
        grown = 1 + (tokens * (multiple - 1)) // self.ramp_tokens
        return self.start * min(multiple, grown)

    def next_change(self, tokens: int) -> int | None:
        """The first token count after `tokens` at which the batch grows, or None when it has stopped growing."""
        if not self.start or self.start == self.final or self.ramp_tokens <= 0:
            return None
        multiple, now = self.final // self.start, self(tokens) // self.start
        if now >= multiple:
            return None
        return -(-now * self.ramp_tokens // (multiple - 1))

    def sizes(self) -> list[int]:
        """Every batch size the schedule passes through, smallest first."""
        if not self.start or self.start == self.final:
            return [self.final]
        return [self.start * m for m in range(1, self.final // self.start + 1)]


def count_steps(batch: BatchSchedule, total_tokens: int) -> int:
    """How many optimizer steps consume `total_tokens`: `len(plan_steps(...))`, counted phase by phase of the
    batch ramp instead of step by step (a 2T-token run has over a hundred million steps)."""
    steps = tokens = 0
    while tokens < total_tokens:
        size = batch(tokens)
        change = batch.next_change(tokens)
        end = total_tokens if change is None else min(change, total_tokens)
        run = max(1, -(-(end - tokens) // size))
        steps += run
        tokens += run * size
    return steps


def plan_steps(batch: BatchSchedule, total_tokens: int) -> list[int]:
    """The global batch (tokens) of every optimizer step until `total_tokens` are consumed."""
    steps, tokens = [], 0
    while tokens < total_tokens:
        size = batch(tokens)
        steps.append(size)
        tokens += size
    return steps


@dataclass(frozen=True)
class Cadence:
    """When a periodic job of the training loop runs (the step log, validation, checkpoints): every `every`
    optimizer steps (0: never on a cadence), and with `at_stop` also at the step the loop stops after."""

    every: int
    at_stop: bool

    def due(self, step: int, *, stopping: bool) -> bool:
        return (stopping and self.at_stop) or (self.every > 0 and step % self.every == 0)
