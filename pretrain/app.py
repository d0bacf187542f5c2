"""Compose, build, train, close: the body of `python -m pretrain` for one rank (torchtitan-style main)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.cli import compose_conf, to_config
from data.log import get_logger
from pretrain.config import PretrainConfig, register_configs

log = get_logger(__name__)

register_configs()


def typed_pretrain_config(cfg: DictConfig) -> PretrainConfig:
    """Resolve, convert to dataclasses and validate before any process group exists."""
    return to_config(cfg, PretrainConfig)


def compose_pretrain_config(overrides: list[str] | None = None) -> PretrainConfig:
    """`conf/config.yaml` with overrides, outside `@hydra.main` (tests, tools)."""
    return to_config(compose_conf("config", overrides), PretrainConfig)


def load_run_config(run_dir: str | Path) -> PretrainConfig:
    """The config a run was trained with, from `runs/<name>/config.yaml` (validated like a fresh one)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {run_dir} a run directory made by `python -m pretrain`?"
        )
    merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(path))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, PretrainConfig)
    config.validate()
    return config


def prepare_data(config: PretrainConfig) -> None:
    """Train the tokenizer and write shards if missing; reuse them when present (cheap checks)."""
    from data.config import DataPipelineConfig
    from data.prepare import ensure_shards
    from data.tokenizer import ensure_tokenizer

    pipeline = DataPipelineConfig(
        paths=config.paths, tokenizer=config.tokenizer, data=config.data, log_level=config.log_level
    )
    ensure_tokenizer(pipeline)
    ensure_shards(pipeline)


def run_rank(config: PretrainConfig) -> None:
    """One rank: join the process group, make sure the data exists (rank 0), train, sample, close."""
    from pretrain import engine as eng
    from pretrain.trainer import Trainer

    env = eng.init_distributed(config.deepspeed.timeout_minutes)
    trainer, clean = None, False
    try:
        if env.is_main:
            prepare_data(config)
        eng.barrier()
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
