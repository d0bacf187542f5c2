"""Every shipped config composes and validates, and every experiment builds its model on the meta device."""

import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml

from data.cli import CONF_DIR
from data.config import ConfigError
from pretrain.batching import batch_layout
from pretrain.config import compose_pretrain_config
from pretrain.model.transformer import Transformer
from pretrain.planning import hardware
from pretrain.planning.hardware import native_bf16, resolve_precision
from pretrain.train.engine import deepspeed_config
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
    """Every value the option's file sets (after its own defaults) is the composed config's, except the ones the
    primary config sets after it; the files are read with PyYAML, not through Hydra."""
    cfg = compose_pretrain_config([f"{group}={option}"])
    primary = yaml.safe_load((CONF / "config.yaml").read_text())
    expected = _yaml_leaves(_option_values(group, option))
    overridden = _yaml_leaves(primary.get(group, {}))
    checked = 0
    for path, value in expected.items():
        if path in overridden or (isinstance(value, str) and "${" in value):
            continue
        got = getattr(cfg, group)
        for key in path:
            got = got[key] if isinstance(got, Mapping) else getattr(got, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, (group, option, ".".join(path))
        checked += 1
    assert checked >= 3, (group, option, checked)


def _option_values(group: str, option: str) -> dict:
    """An option file's values with the options it lists in `defaults` merged under them."""
    raw = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    merged: dict = {}
    for parent in raw.pop("defaults", []):
        if parent != "_self_":
            merged = _merge(merged, _option_values(group, parent))
    return _merge(merged, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _yaml_leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    leaves: dict[tuple[str, ...], object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(_yaml_leaves(value, (*prefix, key)))
        else:
            leaves[(*prefix, key)] = value
    return leaves


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


@pytest.mark.parametrize(
    "override",
    ["train.total_tokens=1e7", "train.global_batch_tokens=1.6384e4", "optim.warmup_tokens=4e3",
     "tokenizer.byte_budget=2e8", "deepspeed.reduce_bucket_size=5e8"],
)  # fmt: skip
def test_counts_accept_scientific_notation(override):
    key, value = override.split("=")
    cfg = compose_pretrain_config([override])
    group, name = key.split(".")
    got = getattr(getattr(cfg, group), name)
    assert type(got) is int and got == float(value)


@pytest.mark.parametrize(("override", "key"), [("train.total_tokens=1234.5", "train.total_tokens"),
                                               ("data.max_doc_chars=2.5", "data.max_doc_chars")])  # fmt: skip
def test_a_count_that_is_not_whole_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: must be a whole number"):
        compose_pretrain_config([override])


def test_deepspeed_extra_merges_key_by_key():
    """A nested extra key (the one the planner reads) keeps the stage, offload and buckets beside it."""
    cfg = compose_pretrain_config(
        ["deepspeed=zero3_offload", "+deepspeed.extra={zero_optimization: {sub_group_size: 1e8}}"]
    )
    layout = batch_layout(cfg.train.global_batch_tokens, cfg.data.packing.seq_len, 8, 2, "k")
    zero = deepspeed_config(cfg, layout)["zero_optimization"]
    assert zero["sub_group_size"] == 1e8
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == cfg.deepspeed.reduce_bucket_size


def test_gradients_accumulate_and_reduce_in_fp32_unless_asked():
    cfg = compose_pretrain_config([])
    layout = batch_layout(cfg.train.global_batch_tokens, cfg.data.packing.seq_len, 8, 2, "k")
    ds = deepspeed_config(cfg, layout, "bf16")
    assert (
        ds["bf16"]["enabled"]
        and ds["data_types"]["grad_accum_dtype"] == ds["communication_data_type"] == "fp32"
    )
    low = compose_pretrain_config(["deepspeed.gradient_dtype=bf16"])
    ds = deepspeed_config(low, layout, "bf16")
    assert ds["data_types"]["grad_accum_dtype"] == ds["communication_data_type"] == "bf16"
    assert deepspeed_config(low, layout, "fp32")["data_types"]["grad_accum_dtype"] == "fp32"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (x86 `flags`, Arm `Features`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {
        flag
        for line in text.splitlines()
        if line.split(":")[0].strip() in ("flags", "Features")
        for flag in line.split(":", 1)[1].split()
    }


def test_precision_auto_is_bf16_exactly_where_the_hardware_has_it():
    """The oracle is the kernel's CPU flags (or torch's CUDA query), not the code's own reading of torch."""
    if torch.cuda.is_available():
        expected = torch.cuda.is_bf16_supported()
    elif platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        expected = bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    else:
        expected = False
    x86 = platform.machine() in ("x86_64", "AMD64")
    if (
        x86
        and not torch.cuda.is_available()
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")
    ):
        assert not expected, "an AVX2-only x86 CPU has no bf16 flag"  # the two outside oracles agree
    fast, why = native_bf16()
    assert fast is expected, (why, sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "bf16"}))
    assert resolve_precision("auto") == ("bf16" if expected else "fp32", f"deepspeed.precision=auto: {why}")
    assert resolve_precision("fp32")[0] == "fp32" and resolve_precision("bf16")[0] == "bf16"


class _CpuInfo:
    """/proc/cpuinfo with the given text, for the Arm branch."""

    def __init__(self, text: str):
        self.text = text

    def __call__(self, _path: str) -> "_CpuInfo":
        return self

    def read_text(self) -> str:
        return self.text


@pytest.mark.parametrize(
    ("machine", "amx", "avx512_bf16", "arm_features", "expected"),
    [("x86_64", False, False, "", "fp32"), ("x86_64", False, True, "", "bf16"), ("x86_64", True, False, "", "bf16"),
     ("aarch64", False, False, "fp asimd sve", "fp32"), ("aarch64", False, False, "fp asimd sve bf16 i8mm", "bf16"),
     ("riscv64", True, True, "bf16", "fp32")],
)  # fmt: skip
def test_precision_auto_on_given_cpus(monkeypatch, machine, amx, avx512_bf16, arm_features, expected):
    """Both answers on any machine: the hardware queries are replaced by the capabilities of the case."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(hardware, "Path", _CpuInfo(f"processor\t: 0\nFeatures\t: {arm_features}\n"))
    assert resolve_precision("auto")[0] == expected


@pytest.mark.parametrize("supported", [True, False])
def test_precision_auto_on_a_cuda_device(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "test device")
    precision, why = resolve_precision("auto")
    assert precision == ("bf16" if supported else "fp32") and "test device" in why


def test_a_run_that_cannot_fit_stops_before_it_starts(tmp_path):
    """The 7B on this machine's CPU ranks: the planner's numbers, before any data or process is made."""
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "+experiment=7b", "data.repetition_policy=warn",
         "train.total_tokens=10000000", f"paths.artifacts={tmp_path}/a", f"paths.runs={tmp_path}/r"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.check_memory: this run does not fit this machine" in result.stderr
    assert "GiB per CPU rank" in result.stderr and "train.check_memory=false" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()
