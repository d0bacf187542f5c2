"""The body of `python -m pretrain` for one rank: join the process group, prepare data, train, sample, close."""

from __future__ import annotations

from data.log import get_logger
from data.prepare import ensure_data
from pretrain.config import PretrainConfig
from pretrain.planning.hardware import local_world_size
from pretrain.planning.memory_check import ensure_fits
from pretrain.train import collectives
from pretrain.train import engine as eng
from pretrain.train.trainer import Trainer

log = get_logger(__name__)


def run_rank(config: PretrainConfig) -> None:
    """One rank: join the process group, make sure the data exists (rank 0), train, sample, close."""
    env = eng.init_distributed(config.deepspeed.timeout_minutes)
    trainer, clean = None, False
    try:
        ensure_fits(config, env.world_size, local_world_size())
        if env.is_main:
            ensure_data(config.data_pipeline())
        collectives.barrier()
        trainer = Trainer(config, env)
        trainer.fit()
        if config.train.sample_prompt and config.train.sample_tokens > 0 and not trainer.preempted:
            text = trainer.sample(config.train.sample_prompt, config.train.sample_tokens)
            if env.is_main:
                log.info("sample:\n%s", text)
        clean = True
    finally:
        if trainer is not None:
            trainer.close()
        eng.shutdown(clean=clean)
