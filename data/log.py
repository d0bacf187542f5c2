"""One rank-aware logger for the whole project.

Rank 0 speaks at INFO; other ranks only report warnings and errors, so a 64-rank job does not print every line
64 times. The rank comes from the launcher's environment (torchrun, deepspeed, srun), so it is known before any
process group exists.
"""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def global_rank() -> int:
    """The process's global rank from the launcher's environment (0 when not launched distributed)."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def setup_logging(level: str = "INFO") -> None:
    """Configure the root `llm` logger once: INFO on rank 0, WARNING elsewhere, rank in every line."""
    global _CONFIGURED
    rank = global_rank()
    logger = logging.getLogger("llm")
    logger.setLevel(getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING)
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """A child of the project logger; call `setup_logging` once in each entry point."""
    if not _CONFIGURED:
        setup_logging()
    short = name.split(".", 1)[-1] if name.startswith(("data.", "pretrain.")) else name
    return logging.getLogger(f"llm.{short}")


def progress_enabled() -> bool:
    """Progress bars only on rank 0 and only when a person is watching."""
    return is_rank_zero() and sys.stderr.isatty() and not os.environ.get("CI")
