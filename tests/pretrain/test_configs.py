"""Every shipped config composes and validates, and every experiment builds its model on the meta device."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.cli import CONF_DIR
from data.config import ConfigError
from pretrain.batching import batch_layout
from pretrain.config import compose_pretrain_config
from pretrain.engine import deepspeed_config
from pretrain.model import Transformer
from tests.helpers import ROOT

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "tokenizer", "data", "deepspeed")
}


def test_experiments_exist():
    assert {"debug", "7b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds_on_meta(experiment):
    cfg = compose_pretrain_config([f"+experiment={experiment}"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.data.packing.seq_len <= cfg.model.max_seq_len


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = compose_pretrain_config([f"{group}={option}"])
    assert cfg is not None


def test_7b_is_llama2_7b():
    cfg = compose_pretrain_config(["+experiment=7b"])
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size, m.max_seq_len) == (
        4096,
        32,
        32,
        11008,
        32000,
        4096,
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(m).parameters())
    assert n == 6_738_415_616


def test_deepspeed_config_is_zero3_bf16_with_derived_accumulation():
    cfg = compose_pretrain_config(["+experiment=7b"])
    layout = batch_layout(cfg.train.global_batch_tokens, 4096, 1, 64, "train.global_batch_tokens")
    ds = deepspeed_config(cfg, layout)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 1.0
    assert ds["train_batch_size"] == 1024 and ds["gradient_accumulation_steps"] == layout.accumulation == 16
    offload = compose_pretrain_config(["+experiment=7b", "deepspeed=zero3_offload"])
    assert deepspeed_config(offload, layout)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("deepspeed.precision=fp8", "deepspeed.precision"),
        ("train.start_batch_tokens=3000", "train.global_batch_tokens"),
        ("logging.wandb_mode=sometimes", "logging.wandb_mode"),
        ("data.packing.seq_len=512", "data.packing.seq_len"),
        ("model.n_heads=5", "model.n_heads"),
    ],
)
def test_wrong_values_fail_early_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_pretrain_config([override])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_a_misspelt_key_in_a_group_fails_at_composition(group):
    option = GROUPS[group][0]
    with pytest.raises(Exception, match="no_such_key"):
        compose_pretrain_config([f"{group}={option}", f"{group}.no_such_key=1"])


@pytest.mark.parametrize(
    "module", ["pretrain", "pretrain.plan", "pretrain.export", "pretrain.evaluate", "pretrain.generate"]
)
def test_help_names_the_command_and_lists_real_options_only(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith((f"{module} is powered by Hydra", f"python -m {module} "))
    assert "_schema" not in result.stdout and "__main__" not in result.stdout
    if module in ("pretrain", "pretrain.plan"):
        assert "model: 125m, 13b, 1b, 350m, 7b, tiny" in result.stdout
