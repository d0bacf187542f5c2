"""benchmarks/gpu_throughput.py on CPU with the debug model: the figures, the FLOPs accounting, the baseline.

The real script runs as a user types it (fresh gloo ranks per case); one sweep run is shared by the module.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_throughput as bench
from benchmarks import throughput_case as case
from pretrain.config import compose_pretrain_config
from pretrain.model.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_throughput.py"
STEPS, WARMUP, RANKS = 2, 1, 2


def run_benchmark(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--experiment", "debug", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
        )
    return done


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> dict:
    """Two of our cases (a ZeRO-3 knob swept, written as 1e6 / 2e6) and the one baseline their shape needs."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    run_benchmark(
        out,
        f"--steps={STEPS}",
        f"--warmup={WARMUP}",
        f"--ranks={RANKS}",
        "--sweep",
        "deepspeed.stage3_prefetch_bucket_size=1e6,2e6",
    )
    return json.loads(out.read_text())


def test_cpu_run_reports_throughput_memory_and_ratio(sweep_report):
    results = {r["name"]: r for r in sweep_report["results"]}
    assert not [r for r in results.values() if "error" in r]
    assert list(results) == [
        "ours deepspeed.stage3_prefetch_bucket_size=1000000",
        "hf seq_len=64 micro_batch=4 grad_accum=1",
        "ours deepspeed.stage3_prefetch_bucket_size=2000000",
    ]
    hf = results["hf seq_len=64 micro_batch=4 grad_accum=1"]
    assert hf["attn_implementation"] == "sdpa"
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0
        assert r["mfu"] is None and r["peak_tflops"] is None  # no peak is known for a CPU
        assert r["memory_gib"]["peak_rss_gib"] > 0
        assert len(r["step_times_s"]) == STEPS and len(r["warmup_step_times_s"]) == WARMUP
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["world_size"] == RANKS and r["zero_stage"] == 3
    for name, r in results.items():
        if r["impl"] == "ours":
            assert r["baseline"] == hf["name"]
            assert r["ratio_vs_baseline"] == pytest.approx(r["tokens_per_s"] / hf["tokens_per_s"])
            assert r["parameters"] == hf["parameters"], "the baseline must have the same parameters"
            assert r["overrides"][-1] == name.removeprefix("ours ")
    assert sweep_report["environment"]["device"].startswith("cpu")


def test_flops_accounting_is_flops_per_token_times_tokens(sweep_report):
    cfg = compose_pretrain_config(["+experiment=debug"])
    seq_len, micro = cfg.data.packing.seq_len, cfg.train.micro_batch_size
    expected_fpt = flops_per_token(cfg.model, seq_len)
    for r in sweep_report["results"]:
        assert r["flops_per_token"] == expected_fpt
        assert r["tokens_per_step"] == seq_len * micro * RANKS * 1
        assert r["timed_tokens"] == r["tokens_per_step"] * STEPS
        assert r["model_flops"] == expected_fpt * r["timed_tokens"]
        assert r["timed_seconds"] == pytest.approx(sum(r["step_times_s"]))
        per_device = r["timed_tokens"] / r["timed_seconds"] * expected_fpt / RANKS / 1e12
        assert r["tflops_per_device"] == pytest.approx(per_device)


def test_computed_attention_flops_count_the_causal_half_of_one_document_rows(sweep_report):
    """Debug rows hold one document: the computed figure drops half of 12 * L * H * T from the full one."""
    cfg = compose_pretrain_config(["+experiment=debug"])
    m, seq_len = cfg.model, cfg.data.packing.seq_len
    half_square = 12 * m.n_layers * m.n_heads * m.head_dim * seq_len / 2
    for r in sweep_report["results"]:
        assert r["flops_per_token_computed_attention"] == pytest.approx(r["flops_per_token"] - half_square)
        ratio = r["tflops_per_device_computed_attention"] / r["tflops_per_device"]
        assert ratio == pytest.approx(r["flops_per_token_computed_attention"] / r["flops_per_token"])
        assert r["mfu_computed_attention"] is None  # no peak on a CPU


def test_a_case_the_memory_check_refuses_becomes_a_result_row(tmp_path):
    """The 7B cannot fit two CPU ranks of this machine: the case is refused with the planner's numbers,
    recorded as a row, and the run still succeeds (exit code 0)."""
    out = tmp_path / "refused.json"
    done = run_benchmark(
        out, "--experiment=7b", "--seq-len=64", "--micro-batch=1", "--steps=1", "--warmup=0", "--no-baseline"
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["refused"].startswith("memory check: model") and "GiB" in result["refused"]
    assert "train.check_memory=false" in result["refused"]
    assert "tokens_per_s" not in result and "error" not in result
    assert result["seq_len"] == 64 and result["world_size"] == RANKS
    assert "REFUSED" in done.stdout


def test_causal_path_without_document_ids(tmp_path):
    out = tmp_path / "causal.json"
    run_benchmark(
        out, "--steps=1", "--warmup=0", "--ranks=1", "--documents=0", "--no-baseline", "--grad-accum=2"
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["attention"] == "sdpa is_causal"
    assert result["grad_accum"] == 2 and result["tokens_per_step"] == 2 * 4 * 64
    assert result["tokens_per_s"] > 0


def test_failing_case_is_reported_with_its_log(tmp_path):
    spec = {
        "name": "ours broken",
        "impl": "ours",
        "experiment": "no_such_experiment",
        "overrides": [],
        "grad_accum": 1,
        "steps": 1,
        "warmup": 0,
        "documents": 1,
        "compile": False,
    }
    result = bench.run_case(spec, world=1, timeout_s=120, work=tmp_path)
    assert result["error"].startswith("a rank exited with code") or result["error"].startswith("ranks exited")
    assert "no_such_experiment" in result["log_tail"]


def test_sweep_values_and_their_cartesian_product():
    assert case.normalize_override("a.b=1e8") == "a.b=100000000"
    assert case.normalize_override("a.b=2.5e3") == "a.b=2500"
    assert case.normalize_override("a.b=1.5e-3") == "a.b=1.5e-3"  # a real float stays a float
    assert case.normalize_override("a.b=true") == "a.b=true"
    points = bench.sweep_overrides(["a=1,2", "b=x,y,z"])
    assert len(points) == 6 and points[0] == ["a=1", "b=x"] and points[-1] == ["a=2", "b=z"]
    assert bench.sweep_overrides([]) == [[]]
    with pytest.raises(SystemExit):
        bench.sweep_overrides(["no_equals_sign"])


def test_baseline_once_per_shape():
    args = bench.parse_args(
        [
            "--sweep",
            "train.micro_batch_size=1,2",
            "--sweep",
            "deepspeed.overlap_comm=true,false",
            "--repeat",
            "2",
        ]
    )
    cases = bench.plan_cases(args, world=2)
    ours = [c for c in cases if c["impl"] == "ours"]
    hf = [c for c in cases if c["impl"] == "hf"]
    assert len(ours) == 8 and len(hf) == 2  # one baseline per micro-batch size, none per ZeRO knob
    assert {c["name"] for c in hf} == {
        "hf seq_len=64 micro_batch=1 grad_accum=1",
        "hf seq_len=64 micro_batch=2 grad_accum=1",
    }
    no_baseline = bench.plan_cases(bench.parse_args(["--no-baseline"]), world=1)
    assert [c["impl"] for c in no_baseline] == ["ours"]


def test_throughput_figures_with_a_peak():
    figures = case.throughput_figures(
        [1.0, 3.0], tokens_per_step=1000, flops_per_token=1e9, world_size=2, peak_tflops=0.5
    )
    assert figures["tokens_per_s"] == 500.0
    assert figures["tflops_per_device"] == pytest.approx(0.25)
    assert figures["mfu"] == pytest.approx(0.5)
    assert figures["median_step_s"] == 2.0


def test_synthetic_batch_packs_equal_documents():
    batch = case.synthetic_batch(vocab_size=100, micro=2, seq_len=12, documents=3, seed=0)
    assert batch["document_ids"][0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3] * 3
    assert batch["labels"][:, :-1].tolist() == batch["input_ids"][:, 1:].tolist()
    assert (batch["labels"][:, -1] == -100).all()
    causal = case.synthetic_batch(vocab_size=100, micro=2, seq_len=12, documents=0, seed=0)
    assert "document_ids" not in causal and causal["position_ids"][0].tolist() == list(range(12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_mfu_is_reported_and_plausible(tmp_path):
    out = tmp_path / "gpu.json"
    run_benchmark(out, "--steps=3", "--warmup=2", "--ranks=1")
    results = json.loads(out.read_text())["results"]
    ours = next(r for r in results if r["impl"] == "ours")
    assert ours["peak_tflops"] is not None, f"no BF16 peak known for {torch.cuda.get_device_name()}"
    for r in results:
        assert 0 < r["mfu"] < 1
        assert r["memory_gib"]["max_allocated_gib"] > 0
    assert ours["attention"].startswith("flex")
    assert ours["ratio_vs_baseline"] > 0


def test_gpu_run_script_parses_and_lists_its_stages():
    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2
    text = script.read_text()
    accepted = text.split('case "$stage" in', 1)[1].split(")", 1)[0]
    stages = [s.strip() for s in accepted.split("|")]
    assert "first10" in stages and "7b-h100-offload" not in stages
    for stage in stages:  # every stage is documented in the usage text and has a branch of its own
        assert f"#   {stage} " in usage.stdout and f"\n  {stage})" in text


@pytest.mark.parametrize(
    ("experiment", "overrides", "grad_accum", "gpu", "fits"),
    [  # the cases of benchmarks/gpu_run.sh, on the lent machines (128 GiB of host memory, ~120 available)
        ("1b", ["train.micro_batch_size=2"], 8, "h100", True),
        ("1b", ["train.micro_batch_size=4", "deepspeed.activation_checkpointing=false"], 8, "h100", True),
        ("1b", ["train.micro_batch_size=2", "deepspeed.offload_optimizer=cpu"], 8, "h100", True),
        ("7b", ["train.micro_batch_size=1"], 4, "h200", True),
        ("debug", [], 1, "h100", True),
        # what the script no longer runs: the planner's 138 GiB of host memory for the 7B's offloaded optimizer
        ("7b", ["train.micro_batch_size=1", "deepspeed.offload_optimizer=cpu"], 16, "h100", False),
        ("7b", ["train.micro_batch_size=1"], 4, "h100", False),
    ],
)
def test_gpu_run_cases_fit_the_lent_machines(experiment, overrides, grad_accum, gpu, fits):
    from dataclasses import fields

    from pretrain.config import PretrainConfig
    from pretrain.planning.plan import ClusterConfig, PlanConfig, build_plan

    seq = [] if experiment == "debug" else ["data.packing.seq_len=4096"]
    cfg = case.compose_case_config(experiment, [*seq, *overrides], grad_accum, 1)
    cluster = ClusterConfig(
        nodes=1, gpus_per_node=1, gpu=gpu, peak_tflops=1.0, cpu_memory_gib=120.0
    )  # fmt: skip
    values = {f.name: getattr(cfg, f.name) for f in fields(PretrainConfig)}
    assert build_plan(PlanConfig(**values, cluster=cluster))["fits"] is fits


def test_refused_rows_get_no_ratio_and_serve_as_no_baseline():
    shape = {"seq_len": 64, "micro_batch": 4, "grad_accum": 1, "world_size": 2}
    shape |= {"activation_checkpointing": True, "offload": "optimizer=none,param=none"}
    results = [
        {"impl": "hf", "name": "hf refused", "refused": "memory check: ...", **shape},
        {"impl": "ours", "name": "ours refused", "refused": "memory check: ...", **shape},
        {"impl": "ours", "name": "ours measured", "tokens_per_s": 30.0, **shape},
    ]
    bench.add_ratios(results)
    assert "ratio_vs_baseline" not in results[1]
    assert results[2]["baseline"] is None and results[2]["ratio_vs_baseline"] is None
    results.append({"impl": "hf", "name": "hf measured", "tokens_per_s": 20.0, **shape})
    bench.add_ratios(results)
    assert results[2]["baseline"] == "hf measured" and results[2]["ratio_vs_baseline"] == 1.5
