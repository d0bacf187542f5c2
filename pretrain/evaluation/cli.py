"""The tools that read a finished run (export, evaluate, generate) as Hydra commands like the trainer.

Each has a primary config in `conf/` (`export.yaml`, `evaluate.yaml`, `generate.yaml`) typed by a dataclass,
so `--help`, `--cfg job` and `key=value` overrides work as everywhere else. The run to read is the key `run`;
as a convenience a leading bare path is taken as `run=<path>`:

    python -m pretrain.export runs/demo out=exports/demo dtype=bf16
    python -m pretrain.evaluate run=runs/demo batches=2

Errors a user can fix (no checkpoint, a broken one, a wrong value) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from data.cli import CONF_DIR, compose_conf, one_line_errors, to_config
from data.shards import ShardError
from data.tokenizer import TokenizerError
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError

T = TypeVar("T")

# What a user can fix by changing the command line or the run directory.
USER_ERRORS = (CheckpointError, ConfigError, TokenizerError, ShardError, FileNotFoundError)


def run_argument(argv: list[str]) -> list[str]:
    """`argv` with a leading bare path (no `=`, not a flag) rewritten as the override `run='<path>'`."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        quoted = argv[0].replace("\\", "\\\\").replace("'", "\\'")
        return [f"run='{quoted}'", *argv[1:]]
    return list(argv)


def hydra_command(
    config_name: str, schema: type[T], body: Callable[[T], Any]
) -> Callable[[list[str] | None], Any]:
    """The `main(argv=None)` of a command: conf/<config_name>.yaml typed as `schema`, then `body(config)`.

    Without `argv` it is the command line (Hydra's own parsing, `--help` included); with `argv` (tests, other
    tools) the same overrides are composed in-process and `body`'s result is returned.
    """
    ConfigStore.instance().store(name=f"_{config_name}_schema", node=schema)

    guarded = one_line_errors(*USER_ERRORS)(body)

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def from_command_line(cfg: DictConfig) -> None:
        guarded(_typed(cfg, schema))

    def main(argv: list[str] | None = None) -> Any:
        if argv is None:
            sys.argv = [sys.argv[0], *run_argument(sys.argv[1:])]
            return from_command_line()
        return guarded(_typed(compose_conf(config_name, run_argument(argv)), schema))

    return main


def _typed(cfg: DictConfig, schema: type[T]) -> T:
    try:
        return to_config(cfg, schema)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from err
