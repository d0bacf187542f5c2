"""Held-out perplexity from a checkpoint on one process, checked against the trainer's own `val/loss`."""

from __future__ import annotations

import json
import math

import pytest

from pretrain.checkpoint import find_checkpoint
from pretrain.evaluate import evaluate, main
from tests.helpers import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_report(debug_run) -> dict:
    return evaluate(debug_run)


def test_default_evaluation_matches_the_trainers_last_val_loss(default_report, debug_run):
    """Same sequences per source as the trainer (eval_batches x micro_batch x 2 ranks); fp32 here, bf16 there."""
    cfg = find_checkpoint(debug_run).config()
    logged = [m for m in read_metrics(debug_run) if "val/loss" in m]
    assert logged, "the trainer logged no val/loss"
    last = logged[-1]
    assert default_report["step"] == last["step"]
    overall = default_report["overall"]
    per_source = cfg.train.eval_batches * cfg.train.micro_batch_size * 2
    assert overall["sequences"] == per_source * len(cfg.data.sources)
    assert overall["tokens"] > 0 and math.isfinite(overall["loss"])
    assert overall["loss"] == pytest.approx(last["val/loss"], rel=0.02)
    assert overall["perplexity"] == pytest.approx(math.exp(overall["loss"]))
    for name, result in default_report["sources"].items():
        assert result["sequences"] == per_source
        assert result["loss"] == pytest.approx(last[f"val/{name}/loss"], rel=0.02)


def test_every_source_is_scored_on_its_own(default_report, debug_run):
    sources = default_report["sources"]
    assert (
        set(sources)
        == set(find_checkpoint(debug_run).config().data.sources)
        == {"python_code", "python_docs"}
    )
    for result in sources.values():
        assert result["tokens"] > 0 and math.isfinite(result["loss"]) and result["sequences"] > 0


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
