"""Held-out perplexity from a checkpoint on one process, checked against the trainer's own `val/loss`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import load_tokenizer
from pretrain.checkpoint import find_checkpoint, load_trained
from pretrain.evaluation.evaluate import evaluate, main
from pretrain.evaluation.generate import main as generate_main
from tests.helpers import ROOT, read_metrics

pytestmark = pytest.mark.slow

# Relative difference allowed between our one-process fp32 evaluation and the trainer's 2-rank fp32 val/loss:
# observed 0.0 (the same float32 sums); 1e-6 leaves room for another reduction order, not for another dtype.
FP32_ORDER_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def default_report(debug_run) -> dict:
    return evaluate(debug_run)


def test_default_evaluation_matches_the_trainers_last_val_loss(default_report, debug_run):
    """Same sequences per source as the trainer (eval_batches x micro_batch x 2 ranks), both in fp32 (the debug
    run is fp32): only the order of float sums differs, 2 ZeRO-3 ranks there, one process here."""
    cfg = find_checkpoint(debug_run).config()
    logged = [m for m in read_metrics(debug_run) if "val/loss" in m]
    assert logged, "the trainer logged no val/loss"
    last = logged[-1]
    assert default_report["step"] == last["step"]
    overall = default_report["overall"]
    per_source = cfg.train.eval_batches * cfg.train.micro_batch_size * 2
    assert overall["sequences"] == per_source * len(cfg.data.sources)
    assert overall["tokens"] > 0 and math.isfinite(overall["loss"])
    assert overall["loss"] == pytest.approx(last["val/loss"], rel=FP32_ORDER_TOLERANCE)
    assert overall["perplexity"] == pytest.approx(math.exp(overall["loss"]))
    for name, result in default_report["sources"].items():
        assert result["sequences"] == per_source
        assert result["loss"] == pytest.approx(last[f"val/{name}/loss"], rel=FP32_ORDER_TOLERANCE)


def test_every_source_is_scored_on_its_own(default_report, debug_run):
    """Each source's loss equals the oracle's on a dataset of that source alone: the first sequences of its
    validation split, each document piece in them run separately from position 0 through the plain model, every
    token but a piece's last predicting the next (summed F.cross_entropy). The two sources' losses differ by far
    more than the tolerance, so scoring one source's sequences under the other's name fails."""
    import dataclasses

    from data.mixture import MixtureDataset

    sources = default_report["sources"]
    assert (
        set(sources)
        == set(find_checkpoint(debug_run).config().data.sources)
        == {"python_code", "python_docs"}
    )
    model, cfg, _ = load_trained(debug_run)
    _, info = load_tokenizer(cfg.tokenizer.dir)
    for name, result in sources.items():
        alone = dataclasses.replace(
            cfg.data, sources={name: dataclasses.replace(cfg.data.sources[name], weight=1.0)}
        )
        dataset = MixtureDataset.from_tokenizer(alone, info, split="val")
        assert result["sequences"] == 8  # eval_batches 1 x micro-batch 4 x 2 ranks
        total, targets = 0.0, 0
        for i in range(result["sequences"]):
            sample = dataset[i]
            tokens, documents = torch.as_tensor(sample["tokens"]), sample["document_ids"].tolist()
            start = 0
            for end in range(1, len(documents) + 1):
                if end < len(documents) and documents[end] == documents[start]:
                    continue
                if documents[start] >= 0 and end - start > 1:
                    piece = tokens[start:end].long()
                    with torch.no_grad():
                        logits = model(piece[None, :-1])[0]
                    total += F.cross_entropy(logits.double(), piece[1:], reduction="sum").item()
                    targets += end - start - 1
                start = end
        assert result["tokens"] == targets
        # Observed: 4.3e-8 relative (fp32, batched and document-masked there, one document at a time here).
        assert result["loss"] == pytest.approx(total / targets, rel=1e-6, abs=0), name
        assert result["perplexity"] == pytest.approx(math.exp(total / targets), rel=1e-6)
    assert abs(sources["python_code"]["loss"] - sources["python_docs"]["loss"]) > 1e-2


def test_whole_split_overall_is_the_token_weighted_mean_of_the_sources(debug_run):
    """Over the whole split the overall token count is the sum of the sources' and its loss their
    token-weighted mean."""
    report = evaluate(debug_run, sequences=0, micro_batch_size=128)
    sources = report["sources"].values()
    tokens = sum(s["tokens"] for s in sources)
    assert report["overall"]["tokens"] == tokens
    mean = sum(s["loss"] * s["tokens"] for s in sources) / tokens
    assert report["overall"]["loss"] == pytest.approx(mean, rel=1e-5)
    assert report["overall"]["sequences"] == sum(s["sequences"] for s in sources)


def test_cli_writes_a_table_and_a_json_report(debug_run, tmp_path, capsys):
    out = tmp_path / "eval" / "report.json"
    main([str(debug_run), "batches=1", f"out={out}", "log_level=WARNING"])
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["precision"] == "fp32"
    assert (
        report["overall"]["sequences"] == 2 * find_checkpoint(debug_run).config().train.micro_batch_size * 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    for name in ("overall", "python_code", "python_docs"):
        assert name in captured.err


def test_cli_prints_json_to_stdout_and_scores_a_chosen_checkpoint(debug_run, capsys):
    oldest = sorted((debug_run / "checkpoints").glob("step_*"))[0]
    main([str(oldest), "sequences=4", "log_level=WARNING"])
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(oldest) and report["step"] == int(oldest.name.split("_")[1])
    assert report["overall"]["sequences"] == 4 * 2


def test_cli_refuses_a_path_without_checkpoints(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no committed checkpoint" in capsys.readouterr().err


def test_rows_per_forward_pass_do_not_change_the_result(default_report, debug_run):
    wide = evaluate(debug_run, micro_batch_size=8)
    assert wide["overall"]["tokens"] == default_report["overall"]["tokens"]
    assert wide["overall"]["loss"] == pytest.approx(default_report["overall"]["loss"], rel=1e-5)


# -- held-out files without long_context, and options that would be ignored ------------------------------


def window_loss_oracle(model, ids: list[int], window: int) -> tuple[float, int]:
    """Summed next-token loss of a document scored in windows of `window` + 1 tokens that overlap by one, each
    run from position 0 with plain causal attention, and its target count: every token but the first, once."""
    total, targets = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        piece = torch.tensor(ids[start : start + window + 1])[None]
        with torch.no_grad():
            logits = model(piece[:, :-1])
        total += F.cross_entropy(logits[0].double(), piece[0, 1:], reduction="sum").item()
        targets += piece.shape[1] - 1
    return total, targets


def test_texts_are_scored_without_long_context_each_file_as_a_source(debug_run, tmp_path):
    """`texts=[...]` scores the user's files (one shorter than a window, one of several windows) instead of the
    run's split; the oracle encodes and windows them by hand and sums F.cross_entropy over our model's logits."""
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    source = (ROOT / "pretrain" / "model" / "transformer.py").read_text()
    files = {held_out / "short.py": source[:60], held_out / "long.py": source[2000:3500]}
    for path, text in files.items():
        path.write_text(text)
    report = main([str(debug_run), f"texts=['{held_out}/*.py']", "micro_batch=3", "log_level=WARNING"])
    assert report["split"] is None and report["texts"] == [f"{held_out}/*.py"]
    assert set(report["sources"]) == {str(p) for p in files}

    model, cfg, _ = load_trained(debug_run)
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    tokenizer.encode_special_tokens = True
    window = cfg.data.packing.seq_len
    sums, counts = 0.0, 0
    for path, text in files.items():
        ids = [info.bos_id, *tokenizer.encode(text, add_special_tokens=False).ids, info.eos_id]
        total, targets = window_loss_oracle(model, ids, window)
        result = report["sources"][str(path)]
        assert result["tokens"] == targets == len(ids) - 1
        # observed: 3e-8 relative (fp32 logits, the oracle sums in fp64)
        assert result["loss"] == pytest.approx(total / targets, rel=1e-6, abs=0)
        assert result["perplexity"] == pytest.approx(math.exp(total / targets), rel=1e-5)
        sums, counts = sums + total, counts + targets
    sequences = [report["sources"][str(held_out / name)]["sequences"] for name in ("short.py", "long.py")]
    assert sequences[0] == 1 and sequences[1] > 2
    assert report["overall"]["tokens"] == counts
    assert report["overall"]["loss"] == pytest.approx(sums / counts, rel=1e-6, abs=0)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        # read only by the long-context report
        (["length=32"], "length"),
        (["passkey_trials=2"], "passkey_trials"),
        (["eval_dir=elsewhere"], "eval_dir"),
        (["compare=[other]"], "compare"),
        (["max_seq_len=128"], "max_seq_len"),
        # read only by the per-source report
        (["long_context=true", "batches=1"], "batches"),
        (["long_context=true", "sequences=4"], "sequences"),
        # replaced by the files
        (["texts=[some.py]", "split=train"], "split"),
        (["texts=[some.py]", "sequences=2"], "sequences"),
    ],
)
def test_an_option_the_chosen_report_would_ignore_is_refused(debug_run, options, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(debug_run), *options, "log_level=WARNING"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("option", ["top_k=5", "top_p=0.9", "seed=3"])
def test_generate_refuses_sampling_options_with_greedy_decoding(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["runs/never-read", "temperature=0", option])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"error: {option.split('=')[0]}: has no effect with temperature=0"
    )
