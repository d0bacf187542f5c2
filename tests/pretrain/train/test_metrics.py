"""MFU: the peak table's card variants, and the FLOPs of both attention conventions, all computed by hand;
the throughput meter's intervals, the loss-spike detector's window and threshold, and the memory figures."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.flops import ModelFlops, attended_pairs
from pretrain.planning.hardware import peak_for_device
from pretrain.train import metrics
from pretrain.train.metrics import SpikeDetector, Throughput, memory_gib

TINY = ModelConfig(name="test", vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64)

# By hand for TINY: N without the input embedding = L(4H^2 + 3HH' + 2H) + H (final norm) + VH (output head)
# = 2 * (4 * 1024 + 3 * 32 * 48 + 64) + 32 + 97 * 32 = 20672, so 6N = 124032; one (query, key) pair costs
# 12 * L * heads * head_dim = 12 * 2 * 4 * 8 = 768 FLOPs.
SIX_N, PAIR = 124_032, 768


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),  # SXM
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_table_tells_sxm_pcie_and_nvl_apart(name, peak):
    assert peak_for_device(name) == peak


def test_model_flops_in_both_conventions_by_hand():
    flops = ModelFlops.of(TINY, 16)
    assert (flops.dense_per_token, flops.per_attention_pair) == (SIX_N, PAIR)
    assert flops.full(1) == SIX_N + PAIR * 16  # 136320: the whole 16 x 16 square
    assert flops.computed(1) == SIX_N + PAIR * 8  # 130176: the causal half, T / 2 pairs per token
    # One row of three documents (3, 5, 8 tokens): (9 + 25 + 64) / 2 = 49 pairs instead of 128.
    assert flops.computed(16, attended_pairs=49) == 16 * SIX_N + 49 * PAIR


def test_attended_pairs_sum_each_documents_square_over_two():
    rows = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [4, 4, 4, 4, 4, -1, -1, -1]])
    assert attended_pairs(rows) == (9 + 25 + 25 + 9) / 2  # padding's run counts, as the kernels compute it
    assert attended_pairs(torch.zeros(3, 8, dtype=torch.int32)) == 3 * 64 / 2  # one document: causal half
    # A document id reused by the next row is still a new document there.
    assert attended_pairs(torch.tensor([[7, 7], [7, 7]])) == 2 * 4 / 2


def test_throughput_names_its_conventions_and_the_computed_figure_counts_documents():
    meter = Throughput(ModelFlops.of(TINY, 16), world_size=2, peak=100.0)
    meter.add(16, attended_pairs=49)
    meter.add(16)  # no documents known: the causal half
    out = meter.report()
    full, computed = 32 * (SIX_N + 16 * PAIR), 32 * SIX_N + (49 + 128) * PAIR
    ratio = out["perf/tflops_per_device_computed_attention"] / out["perf/tflops_per_device_full_attention"]
    assert ratio == pytest.approx(computed / full, rel=1e-12)
    assert out["perf/mfu_full_attention"] == pytest.approx(out["perf/tflops_per_device_full_attention"] / 100)
    assert out["perf/mfu_computed_attention"] < out["perf/mfu_full_attention"]
    # A plain number of FLOPs per token (no model) reports the full-square convention alone.
    plain = Throughput(1e9, world_size=1, peak=None)
    plain.add(10)
    assert set(plain.report()) == {"perf/tokens_per_s", "perf/tflops_per_device_full_attention"}


def test_the_trainer_logs_both_attention_conventions(debug_run):
    """The debug run's log carries the full-square and the computed-attention throughput of every logged step;
    its packed rows hold several documents at times, so the computed figure is below the causal half's bound."""
    from tests.helpers import read_metrics

    steps = [m for m in read_metrics(debug_run) if "perf/tokens_per_s" in m]
    assert steps
    for m in steps:
        full = m["perf/tflops_per_device_full_attention"]
        computed = m["perf/tflops_per_device_computed_attention"]
        assert 0 < computed < full


class FakeClock:
    """`time.perf_counter` for the meter, moved by hand: intervals are exact and nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_throughput_counts_each_report_over_the_interval_since_the_previous_one(clock):
    meter = Throughput(1e12, world_size=1, peak=None)
    meter.add(100)
    clock.now += 10.0
    assert meter.report()["perf/tokens_per_s"] == pytest.approx(10.0)
    meter.add(300)
    clock.now += 3.0
    # 300 tokens over the 3 s since the previous report, not 400 tokens over the 13 s since the start.
    assert meter.report()["perf/tokens_per_s"] == pytest.approx(100.0)
    clock.now += 5.0
    idle = meter.report()
    assert idle["perf/tokens_per_s"] == 0.0
    assert idle["perf/tflops_per_device_full_attention"] == 0.0


def test_a_report_clears_the_computed_attention_flops_too(clock):
    meter = Throughput(ModelFlops.of(TINY, 16), world_size=1, peak=None)
    meter.add(16, attended_pairs=49)
    clock.now += 1.0
    assert meter.report()["perf/tflops_per_device_computed_attention"] == pytest.approx(
        (16 * SIX_N + 49 * PAIR) / 1e12
    )
    clock.now += 1.0
    assert meter.report()["perf/tflops_per_device_computed_attention"] == 0.0


def test_tflops_are_per_device_and_mfu_is_their_share_of_the_peak(clock):
    meter = Throughput(2e9, world_size=4, peak=250.0)
    meter.add(1_000_000)
    clock.now += 2.0
    out = meter.report()
    # 500k tokens/s x 2 GFLOP/token = 1000 TFLOP/s over 4 devices = 250 TFLOP/s each: the whole peak.
    assert out["perf/tokens_per_s"] == pytest.approx(500_000.0)
    assert out["perf/tflops_per_device_full_attention"] == pytest.approx(250.0)
    assert out["perf/mfu_full_attention"] == pytest.approx(1.0)


def test_a_report_in_the_same_instant_as_the_last_is_finite(clock):
    meter = Throughput(ModelFlops.of(TINY, 16), world_size=1, peak=100.0)
    meter.add(16)
    out = meter.report()  # the clock has not moved
    assert all(math.isfinite(v) for v in out.values())
    assert out["perf/tokens_per_s"] > 0


@pytest.mark.parametrize("peak", [None, 0.0])
def test_mfu_is_reported_only_when_the_peak_is_known(clock, peak):
    meter = Throughput(ModelFlops.of(TINY, 16), world_size=1, peak=peak)
    meter.add(16)
    clock.now += 1.0
    out = meter.report()
    assert not [k for k in out if "mfu" in k]
    assert "perf/tflops_per_device_computed_attention" in out
    with_peak = Throughput(ModelFlops.of(TINY, 16), world_size=1, peak=100.0)
    with_peak.add(16)
    clock.now += 1.0
    assert {k for k in with_peak.report() if "mfu" in k} == {
        "perf/mfu_full_attention",
        "perf/mfu_computed_attention",
    }


def primed(values: list[float], sigma: float) -> SpikeDetector:
    detector = SpikeDetector(window=len(values), sigma=sigma)
    for value in values:
        assert not detector.update(value)
    return detector


def test_no_loss_is_flagged_before_the_window_is_full():
    detector = SpikeDetector(window=4, sigma=1.0)
    assert [detector.update(x) for x in (1.0, 1.0, 1.0)] == [False, False, False]
    assert not detector.update(1e6)  # three losses known: the window of four is not full yet
    assert detector.update(1e7)  # now it is (1, 1, 1, 1e6), and 1e7 is far above it


@pytest.mark.parametrize(("loss", "spike"), [(3.999, False), (4.0, False), (4.001, True), (100.0, True)])
def test_a_spike_is_flagged_only_above_sigma_standard_deviations_over_the_window_mean(loss, spike):
    # The window (1, 3, 1, 3): mean 2, standard deviation 1, so with sigma 2 the threshold is exactly 4.
    assert primed([1.0, 3.0, 1.0, 3.0], sigma=2.0).update(loss) is spike


def test_the_window_slides_so_old_losses_stop_counting():
    detector = primed([100.0, 100.0, 100.0], sigma=3.0)
    for _ in range(3):
        assert not detector.update(1.0)  # far below the window of 100s
    # The window now holds (1, 1, 1) alone: 2 is a spike against it, as it would not be against the 100s too.
    assert detector.update(2.0)


def test_a_flat_window_flags_a_real_rise_but_not_float_noise():
    detector = primed([2.0] * 5, sigma=6.0)
    assert not detector.update(2.0 + 1e-7)  # the standard deviation's floor (1e-6) absorbs rounding noise
    assert primed([2.0] * 5, sigma=6.0).update(2.001)


def test_non_finite_losses_stay_out_of_the_window():
    detector = primed([1.0, 2.0, 3.0], sigma=1.0)  # mean 2, threshold 2 + 0.816
    detector.update(float("nan"))
    assert detector.update(float("inf"))
    # Had either entered the window its mean would be NaN or infinite and nothing would be flagged again.
    assert detector.update(3.5)
    assert list(detector.history) == [2.0, 3.0, 3.5]


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's own figures in /proc")
def test_on_cpu_the_memory_figure_is_the_process_peak_rss_in_gib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    floor = proc_status_kib("VmHWM") / 2**20  # the kernel's peak resident set, KiB -> GiB
    out = memory_gib()
    assert set(out) == {"memory/peak_rss_gib"}
    # The peak the kernel reports for this process (its counters are per CPU, so a little either way; more only
    # when the process before its exec was bigger), and never more than the machine has.
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2**20
    assert 0.95 * floor <= out["memory/peak_rss_gib"] <= total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_memory_figures_are_the_allocators_peaks_in_gib():
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    out = memory_gib()
    assert set(out) == {"memory/max_allocated_gib", "memory/max_reserved_gib"}
    assert out["memory/max_allocated_gib"] >= 0.25
    assert out["memory/max_reserved_gib"] >= out["memory/max_allocated_gib"]
    del block
