"""One rank of an initial-weights probe (run by torchrun from tests/pretrain/model/test_parity.py).

Builds the real `pretrain.train.trainer.Trainer` (which seeds torch and builds the model under `deepspeed.zero.Init`,
sharded over the ranks), gathers every ZeRO-3 parameter back to its full shape before any step, and writes the
full state dict (our parameter names) from rank 0 to `--out`. Overrides after `--` are Hydra overrides.

    torchrun --standalone --nproc_per_node=2 tests/pretrain/model/init_probe.py --out init.pt -- +experiment=debug ...
"""

from __future__ import annotations

import argparse

import deepspeed
import torch

from pretrain.config import compose_pretrain_config
from pretrain.train import engine as eng
from pretrain.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose_pretrain_config(args.overrides)
    env = eng.init_distributed(cfg.deepspeed.timeout_minutes)
    trainer, clean = None, False
    try:
        trainer = Trainer(cfg, env)
        model = trainer.engine.model
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {name: param.detach().clone() for name, param in model.named_parameters()}
        if env.is_main:
            torch.save({"world_size": env.world_size, "state": state}, args.out)
        clean = True
    finally:
        if trainer is not None:
            trainer.close()
        eng.shutdown(clean=clean)


if __name__ == "__main__":
    main()
