"""`python -m pretrain [hydra overrides]`: compose, prepare missing data, start or join the ranks, train."""

from __future__ import annotations

import os
import sys

# Bitwise-repeatable CPU runs (exact resume): MKL documents that outside its conditional numerical
# reproducibility mode a GEMM's result may depend on its operands' memory alignment. (On the Xeon the suite runs
# on, sgemm gave the same bits at every alignment and thread count without it.) MKL reads this at its first
# call, so it is set before torch is imported, in every rank; a user's setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import hydra
from omegaconf import DictConfig

from data.prepare import USER_ERRORS, ensure_data
from pretrain.config import ConfigError, typed_pretrain_config
from pretrain.planning.memory_check import ensure_fits
from pretrain.train.app import run_rank
from pretrain.train.launch import (
    accept_launcher_arguments,
    default_local_processes,
    spawn_local,
    under_launcher,
)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = typed_pretrain_config(cfg)
        if under_launcher():
            run_rank(config)
            return
        ranks = default_local_processes(config.train.local_processes)
        ensure_fits(config, ranks, ranks)
        ensure_data(config.data_pipeline())
    except (ConfigError, *USER_ERRORS) as err:  # what the user can change: one line, not a traceback
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    code = spawn_local(ranks, sys.argv[1:])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    accept_launcher_arguments()
    main()
