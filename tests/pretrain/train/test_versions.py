"""The DeepSpeed version is part of the math: pinned, checked at start-up, and every repair of its internals
fails loudly when they move (the gradient-scale probe itself runs in tests/pretrain/train/test_gradients.py)."""

from __future__ import annotations

from types import SimpleNamespace

import deepspeed
import pytest
import tomllib
import torch
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from pretrain.train import versions
from pretrain.train.engine import TrainingEngine
from tests.helpers import ROOT


def test_pyproject_pins_the_tested_range_and_the_installed_deepspeed_is_in_it():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if d.startswith("deepspeed")]
    assert pins == ["deepspeed>=0.19.8,<0.20"]
    assert versions.tested_range() == ">=0.19.8,<0.20"
    versions.check_deepspeed_version(deepspeed.__version__, allow_untested=False)


@pytest.mark.parametrize("installed", ["0.19.8", "0.19.12", "0.19.99"])
def test_versions_in_the_tested_range_start(installed):
    versions.check_deepspeed_version(installed, allow_untested=False)


@pytest.mark.parametrize("installed", ["0.15.0", "0.18.3", "0.19.7", "0.20.0", "0.20", "1.0.0", "0.19.8rc1"])
def test_versions_outside_the_tested_range_stop_with_what_to_do(installed):
    with pytest.raises(RuntimeError) as error:
        versions.check_deepspeed_version(installed, allow_untested=False)
    message = str(error.value)
    assert f"DeepSpeed {installed} is installed" in message
    assert "deepspeed>=0.19.8,<0.20" in message
    assert "deepspeed.allow_untested_version=true" in message
    versions.check_deepspeed_version(installed, allow_untested=True)  # the override accepts the risk


def test_a_missing_deepspeed_internal_names_the_version_and_the_attribute():
    with pytest.raises(RuntimeError) as error:
        versions.deepspeed_private(SimpleNamespace(), "fp32_partitioned_groups_flat", "0.19.8")
    message = str(error.value)
    assert f"DeepSpeed {deepspeed.__version__}" in message
    assert "'fp32_partitioned_groups_flat'" in message and "0.19.8" in message


class MovedZeroOptimizer(ZeROOptimizer):
    """A DeepSpeed ZeRO optimizer wrapper from a release that renamed what our repairs edit."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def engine_over(ds_engine, zero_stage: int = 3) -> TrainingEngine:
    """Our `TrainingEngine` around `ds_engine`, without building a model (only the repairs are exercised)."""
    engine = object.__new__(TrainingEngine)
    engine.deepspeed_engine = ds_engine
    engine.cfg = SimpleNamespace(deepspeed=SimpleNamespace(zero_stage=zero_stage))
    engine.initial_group_hyperparameters = [{"weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}]
    return engine


def inner() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])


def test_step_counter_repair_fails_loudly_without_zero3_partitions():
    engine = engine_over(SimpleNamespace(optimizer=MovedZeroOptimizer(optimizer=inner())))
    with pytest.raises(RuntimeError, match=r"fp32_partitioned_groups_flat.*DeepSpeed 0\.19\.8"):
        engine._unshare_step_counters()
    engine_over(
        engine.deepspeed_engine, zero_stage=2
    )._unshare_step_counters()  # nothing to repair on ZeRO-1/2


@pytest.mark.parametrize("repair", ["universal", "restart"])
def test_optimizer_group_repairs_fail_loudly_without_the_inner_optimizer(repair):
    engine = engine_over(SimpleNamespace(optimizer=MovedZeroOptimizer(fp32_partitioned_groups_flat=[])))
    with pytest.raises(RuntimeError, match=r"no attribute 'optimizer'.*DeepSpeed 0\.19\.8"):
        if repair == "universal":
            engine._repair_universal_load(None)
        else:
            engine.restart_optimizer(keep_moments=False)


def test_universal_load_flag_fails_loudly_when_deepspeed_moves_it():
    no_flag = SimpleNamespace(_config=SimpleNamespace(), load_universal_checkpoint=lambda: False)
    with pytest.raises(RuntimeError, match="no attribute 'load_universal_checkpoint'"):
        versions.set_universal_load(no_flag, True)
    config = SimpleNamespace(load_universal_checkpoint=False)
    ignores_it = SimpleNamespace(_config=config, load_universal_checkpoint=lambda: False)
    with pytest.raises(RuntimeError, match=r"no longer follows _config\.load_universal_checkpoint"):
        versions.set_universal_load(ignores_it, True)
    follows_it = SimpleNamespace(
        _config=config, load_universal_checkpoint=lambda: config.load_universal_checkpoint
    )
    versions.set_universal_load(follows_it, True)
    assert config.load_universal_checkpoint is True
