"""Export to a Hugging Face Llama directory, checked numerically against transformers' own LlamaForCausalLM.

One real debug run (2 CPU ranks, ZeRO-3) is trained per module and exported; tiny models built directly cover the
config paths the debug run does not use (tied embeddings, rope scaling, base scaling, one key/value head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pretrain.checkpoint import find_checkpoint, load_trained
from pretrain.config import ModelConfig, compose_pretrain_config
from pretrain.evaluation.export import ExportError, main, write_hf_model
from pretrain.model.transformer import Transformer
from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(debug_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    main([str(debug_run), f"out={out}"])
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(debug_artifacts) -> str:
    return compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"]).tokenizer.dir


def safetensors_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name).dtype for name in handle.keys()}  # noqa: SIM118


def hf_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(directory)).to(torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_export_writes_a_complete_llama_directory(exported, debug_run):
    names = {p.name for p in exported.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"
    config = json.loads((exported / "config.json").read_text())
    cfg = find_checkpoint(debug_run).config().model
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
        cfg.dim,
        cfg.n_layers,
        cfg.ffn_dim,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["rope_scaling"] is None and config["torch_dtype"] == "float32"
    dtypes = safetensors_dtypes(exported)
    assert "lm_head.weight" in dtypes and "model.layers.1.self_attn.k_proj.weight" in dtypes
    assert all(name == "lm_head.weight" or name.startswith("model.") for name in dtypes)
    assert set(dtypes.values()) == {torch.float32}


def test_transformers_logits_equal_ours_on_the_trained_weights(exported, debug_run):
    ours, _, _ = load_trained(debug_run)
    input_ids = torch.randint(
        0, ours.cfg.vocab_size, (2, ours.cfg.max_seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = ours(input_ids)
    got = hf_logits(exported, input_ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0.1  # trained weights, not a degenerate all-equal output


@pytest.fixture(scope="module")
def tiny_export(tokenizer_dir, tmp_path_factory) -> Path:
    """An export of an untrained tiny model: the tokenizer files do not depend on the weights."""
    cfg = ModelConfig(name="t", vocab_size=512, dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=8)
    return write_hf_model(
        tmp_path_factory.mktemp("tiny") / "hf", Transformer(cfg).state_dict(), cfg, tokenizer_dir
    )


def test_auto_tokenizer_encodes_like_training(tiny_export, tokenizer_dir):
    from data.tokenize_pool import encode_documents
    from data.tokenizer import load_tokenizer

    ours, info = load_tokenizer(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_export))
    texts = ("def area(r):\n    return 3.14 * r ** 2\n", "Unicode: naïve café — ok", "  leading spaces",
             "a </s> in the text, and <pad> too")  # special tokens spelled in text are text  # fmt: skip
    for text in texts:
        # A training document is [BOS] + ids + [EOS]; a text to score or continue is that document before EOS.
        document, _ = encode_documents(ours, [text], info.eos_id, np.dtype(np.int64), info.bos_id)
        assert theirs(text)["input_ids"] == document[:-1].tolist()
        assert document[0] == info.bos_id
        assert theirs(text, add_special_tokens=False)["input_ids"] == document[1:-1].tolist()
        assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == ours.decode(
            document.tolist()
        )
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        info.bos_id,
        info.eos_id,
        info.pad_id,
    )
    tokenizer_config = json.loads((tiny_export / "tokenizer_config.json").read_text())
    assert (tokenizer_config["add_bos_token"], tokenizer_config["add_eos_token"]) == (True, False)
    config = json.loads((tiny_export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        info.bos_id,
        info.eos_id,
        info.pad_id,
    )


def test_bfloat16_export_loads_in_transformers(debug_run, tmp_path):
    out = tmp_path / "bf16"
    main([str(debug_run), f"out={out}", "dtype=bfloat16"])
    assert set(safetensors_dtypes(out).values()) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.config.num_key_value_heads == 2


def test_default_destination_is_inside_the_run(debug_run, capsys):
    main([str(debug_run)])
    written = Path(capsys.readouterr().out.strip())
    tag = find_checkpoint(debug_run).tag
    assert written == debug_run / "hf" / tag and (written / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(
            dict(n_kv_heads=1, tie_embeddings=True, rope_scaling=2.0, max_seq_len=48), id="gqa1-tied-interp"
        ),
        pytest.param(dict(n_kv_heads=None, rope_base_scaling=4.0, rope_base=500.0), id="mha-untied-base"),
    ],
)
def test_config_paths_of_tiny_models_match_transformers(overrides, tokenizer_dir, tmp_path):
    cfg = replace(
        ModelConfig(name="t", vocab_size=512, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=32),
        **overrides,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norm weights of ones would hide a norm mapped to the wrong place
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    out = write_hf_model(tmp_path / "hf", model.state_dict(), cfg, tokenizer_dir)

    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == cfg.kv_heads
    assert config["tie_word_embeddings"] is cfg.tie_embeddings
    assert config["rope_theta"] == cfg.rope_base * cfg.rope_base_scaling
    expected_scaling = (
        {"rope_type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else None
    )
    assert config["rope_scaling"] == expected_scaling
    assert ("lm_head.weight" in safetensors_dtypes(out)) is not cfg.tie_embeddings

    input_ids = torch.randint(
        0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = model(input_ids)
    assert (hf_logits(out, input_ids) - expected).abs().max().item() <= 1e-4


def test_a_failed_export_leaves_the_previous_one_intact(tokenizer_dir, tmp_path, monkeypatch):
    from pretrain.evaluation import export as export_module

    cfg = ModelConfig(name="t", vocab_size=512, dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=8)
    out = write_hf_model(tmp_path / "hf", Transformer(cfg).state_dict(), cfg, tokenizer_dir)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(export_module, "TOKENIZER_FILES", ("tokenizer.json", "missing.json"))
    with pytest.raises(ExportError, match=r"missing\.json"):
        write_hf_model(out, Transformer(cfg).state_dict(), cfg, tokenizer_dir)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("command", ["pretrain.export", "pretrain.evaluate", "pretrain.generate"])
def test_a_missing_run_is_one_line_on_stderr_and_status_2(command, tmp_path):
    """Run as a user runs it: an expected error is the message alone, never a traceback."""
    missing = tmp_path / "runs" / "nope"
    result = subprocess.run(
        [sys.executable, "-m", command, str(missing)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {missing} is not a directory; pass a run directory (runs/<name>) or one of its checkpoints"
    )
