"""The gradient the trainer applies is the anchors' gradient, measured on the real DeepSpeed ZeRO-3 engine.

* Accumulated in fp32: after 8 micro-batches of a bf16 model the accumulated gradient equals the fp32 sum of
  the micro-batch gradients to fp32 precision; accumulating in bf16 (`deepspeed.gradient_dtype=bf16`, what
  DeepSpeed does by default) is off by orders of magnitude more.
* Normalised per target token of the global batch: one batch with padding and masked targets gives the same
  gradient in fp32 for micro-batches of 1 and 4 rows and for 1 and 2 ranks.
* Reduced across ranks in fp32 when the model is bf16: two ranks' gradients 1 and 2**-9, each exact in bf16,
  reduce to exactly 1 + 2**-9; a bf16 reduction (`communication_data_type: bf16`) gives 1.
* With Mixture-of-Experts layers: the router losses (load balancing and z-loss) join the gradient once per
  micro-batch, weighted 1 / micro-batches of the global batch, with activation checkpointing on (2 ranks x 2
  micro-batches against a plain model's per-micro-batch sum, fp32, within 1e-5); and routing forced apart by
  rank (each rank's tokens on experts the other never uses) trains 20 ZeRO-3 steps on 2 ranks with no hang
  and no disagreement over which parameters to gather.
* Scaled as the trainer assumes: the start-up probe refuses a DeepSpeed whose hook divides by the accumulation
  steps under `backward(scale_wrt_gas=False)` (DeepSpeed 0.18.3), and passes in every probe above.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

PROBE = ROOT / "tests" / "pretrain" / "train" / "grad_probe.py"


def launch(out: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
        str(PROBE), *args, "--out", str(out),
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def probe(tmp_path: Path, ranks: int, *args: str) -> dict:
    out = tmp_path / f"grads-{ranks}-{re.sub(r'[^A-Za-z0-9.]+', '-', '-'.join(args))}.pt"
    result = launch(out, ranks, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True)


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """|got - want| / |want| over all parameters together."""
    diff = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want)
    norm = sum(float(want[n].double().pow(2).sum()) for n in want)
    return (diff / norm) ** 0.5


def test_bf16_model_accumulates_gradients_in_fp32(tmp_path):
    fp32 = probe(tmp_path, 1, "--micro", "1", "--precision", "bf16", "--reference")
    bf16 = probe(
        tmp_path, 1, "--micro", "1", "--precision", "bf16", "--gradient-dtype", "bf16", "--reference"
    )
    assert torch.equal(torch.cat([t.flatten() for t in fp32["reference"].values()]),
                       torch.cat([t.flatten() for t in bf16["reference"].values()]))  # fmt: skip
    exact = relative_error(fp32["grads"], fp32["reference"])
    rounded = relative_error(bf16["grads"], bf16["reference"])
    assert exact < 1e-6, exact
    assert rounded > 100 * max(exact, 1e-7), (rounded, exact)


def test_gradient_is_per_target_token_of_the_global_batch(tmp_path):
    one_row = probe(tmp_path, 1, "--micro", "1")
    four_rows = probe(tmp_path, 1, "--micro", "4")
    two_ranks = probe(tmp_path, 2, "--micro", "1")
    assert one_row["targets"] == four_rows["targets"] == two_ranks["targets"]
    assert relative_error(four_rows["grads"], one_row["grads"]) < 1e-6
    assert relative_error(two_ranks["grads"], one_row["grads"]) < 1e-6


def test_bf16_gradients_are_reduced_across_ranks_in_fp32(tmp_path):
    fp32 = probe(tmp_path, 2, "--micro", "1", "--precision", "bf16", "--reduction")["grad"]
    bf16 = probe(
        tmp_path, 2, "--micro", "1", "--precision", "bf16", "--reduction",
        "--set", "+deepspeed.extra.communication_data_type=bf16",
    )["grad"]  # fmt: skip
    exact = torch.full((1, 16), 1.0 + 2.0**-9)  # the fp32 sum of rank 0's 1 and rank 1's 2**-9
    assert torch.equal(fp32, exact), fp32
    assert torch.equal(bf16, torch.ones(1, 16)), bf16  # the probe tells a bf16 reduction apart


def test_startup_refuses_deepspeed_that_divides_by_accumulation_steps(tmp_path):
    result = launch(tmp_path / "never-written.pt", 1, "--micro", "1", "--break-scaling")
    assert result.returncode != 0
    # The probe accumulates 2 micro-batches, so DeepSpeed 0.18.3's hook halves the gradient.
    assert "scales the gradient by 0.5 (expected 1)" in result.stderr, result.stderr[-4000:]


MOE = (
    "--set", "model.moe.num_experts=4", "--set", "model.moe.expert_ffn_dim=88",
    "--set", "model.moe.load_balance_coef=0.1", "--set", "model.moe.z_loss_coef=0.01",
)  # fmt: skip


def test_moe_router_losses_join_the_gradient_once_per_micro_batch(tmp_path):
    got = probe(
        tmp_path, 2, "--micro", "2", "--reference", *MOE, "--set", "deepspeed.activation_checkpointing=true"
    )
    assert relative_error(got["grads"], got["reference"]) < 1e-5
    routers = [name for name in got["grads"] if name.endswith("router.weight")]
    assert routers and all(got["grads"][name].norm() > 0 for name in routers)
    for name in routers:  # the router's own gradient, where dropping or doubling its losses would show first
        assert relative_error({name: got["grads"][name]}, {name: got["reference"][name]}) < 1e-5, name


def test_disjoint_routing_across_two_zero3_ranks_trains_20_steps(tmp_path):
    steps = probe(tmp_path, 2, "--micro", "2", "--disjoint-steps", "20", *MOE)["steps"]
    assert len(steps) == 20
    for step in steps:
        rank0, rank1 = step["counts"]
        assert rank0[2] == rank0[3] == 0 and rank1[0] == rank1[1] == 0, step["counts"]
        assert min(rank0[0], rank0[1], rank1[2], rank1[3]) > 0, step["counts"]
        assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"]  # the same batch every step: it is being learnt
