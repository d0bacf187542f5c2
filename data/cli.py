"""Turning a composed Hydra config into validated, typed config objects for the data commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from data.config import DataPipelineConfig, register_data_configs
from data.log import setup_logging

T = TypeVar("T", bound=Any)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_data_configs()


def one_line_errors(*errors: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command's body so that an expected error (one the user fixes: a config value, a missing
    tokenizer, shard or file) prints one line `error: ...` on stderr and exits with status 2, as the trainer
    does; a traceback would bury the message that says what to do. Any other error keeps its traceback."""

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return body(*args, **kwargs)
            except errors as err:
                sys.stderr.write(f"error: {err}\n")
                raise SystemExit(2) from err

        return guarded

    return decorate


def to_config(cfg: DictConfig, cls: type[T]) -> T:
    """Resolve interpolations, convert to the dataclass `cls`, validate, and set up logging."""
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, cls), type(config)
    config.validate()
    setup_logging(config.log_level)
    return config


def compose_conf(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a primary config of `conf/` with overrides outside `@hydra.main` (tests, tools, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def typed_data_config(cfg: DictConfig) -> DataPipelineConfig:
    return to_config(cfg, DataPipelineConfig)


def compose_data_config(overrides: list[str] | None = None) -> DataPipelineConfig:
    """`conf/data_pipeline.yaml` with overrides (tests, benchmarks, the trainer)."""
    return to_config(compose_conf("data_pipeline", overrides), DataPipelineConfig)
