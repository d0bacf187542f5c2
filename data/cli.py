"""Turning a composed Hydra config into validated, typed config objects for the data commands."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.config import DataPipelineConfig, register_data_configs
from data.log import setup_logging

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_data_configs()


def typed_data_config(cfg: DictConfig) -> DataPipelineConfig:
    """Resolve interpolations, convert to dataclasses, validate, and set up logging."""
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, DataPipelineConfig), type(config)
    config.validate()
    setup_logging(config.log_level)
    return config


def compose_data_config(overrides: list[str] | None = None) -> DataPipelineConfig:
    """Compose `conf/data_pipeline.yaml` with overrides outside `@hydra.main` (tests, benchmarks, the trainer)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="data_pipeline", overrides=list(overrides or []))
    return typed_data_config(cfg)
