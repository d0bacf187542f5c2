"""`python -m pretrain [hydra overrides]`: compose, prepare missing data, start or join the ranks, train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.app import run_rank, typed_pretrain_config
from pretrain.launch import default_local_processes, spawn_local, under_launcher


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config = typed_pretrain_config(cfg)
    if under_launcher():
        run_rank(config)
        return
    from pretrain.app import prepare_data

    prepare_data(config)
    code = spawn_local(default_local_processes(config.train.local_processes), sys.argv[1:])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
