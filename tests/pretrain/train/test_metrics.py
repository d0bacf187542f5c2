"""MFU: the peak table's card variants, and the FLOPs of both attention conventions, all computed by hand."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.flops import ModelFlops, attended_pairs
from pretrain.planning.hardware import peak_for_device
from pretrain.train.metrics import Throughput

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
