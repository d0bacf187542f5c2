"""Preemption signals and fault drills.

`StopRequest` turns SIGUSR1 (Slurm's `--signal=B:USR1@grace`, forwarded by slurm/pretrain.sh) and SIGTERM
(preemption, `scancel`) into a flag; the trainer agrees on it across ranks after every step, so every rank stops
at the same step, saves one checkpoint and exits. A second signal changes nothing.

`FaultDrills` reads environment variables that make a rank misbehave on purpose, so the tests exercise the
real recovery paths: a SIGKILL after a step, a NaN loss, a rank that hangs in a collective.
"""

from __future__ import annotations

import os
import signal
import time

from data.log import get_logger

log = get_logger(__name__)

KILL_AT_STEP = "PRETRAIN_FAULT_KILL_AT_STEP"  # rank 0 SIGKILLs itself right after this step
NAN_AT_STEPS = "PRETRAIN_FAULT_NAN_AT_STEPS"  # comma-separated steps whose loss is NaN on every rank
HANG_AT_STEP = "PRETRAIN_FAULT_HANG_AT_STEP"  # the last rank stops answering collectives at this step


class StopRequest:
    """A flag set by SIGUSR1 or SIGTERM; install once per rank."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class FaultDrills:
    """Faults injected on purpose, read once from the environment (all off by default)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.kill_at = _int(os.environ.get(KILL_AT_STEP))
        self.nan_at = {int(s) for s in os.environ.get(NAN_AT_STEPS, "").split(",") if s.strip()}
        self.hang_at = _int(os.environ.get(HANG_AT_STEP))
        if self.kill_at or self.nan_at or self.hang_at:
            log.warning(
                "fault drills on: kill at %s, NaN at %s, hang at %s", self.kill_at, self.nan_at, self.hang_at
            )

    def poison_loss(self, step: int) -> bool:
        return step in self.nan_at

    def after_step(self, step: int) -> None:
        if self.kill_at == step and self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_at == step and self.rank == self.world_size - 1:
            log.warning("fault drill: rank %d hangs at step %d", self.rank, step)
            while True:
                time.sleep(3600)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip() else None
