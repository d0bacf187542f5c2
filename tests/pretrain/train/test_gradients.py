"""The gradient the trainer applies is the anchors' gradient, measured on the real DeepSpeed ZeRO-3 engine.

* Accumulated in fp32: after 8 micro-batches of a bf16 model the accumulated gradient equals the fp32 sum of
  the micro-batch gradients to fp32 precision; accumulating in bf16 (`deepspeed.gradient_dtype=bf16`, what
  DeepSpeed does by default) is off by orders of magnitude more.
* Normalised per target token of the global batch: one batch with padding and masked targets gives the same
  gradient in fp32 for micro-batches of 1 and 4 rows and for 1 and 2 ranks.
* Reduced across ranks in fp32 when the model is bf16: two ranks' gradients 1 and 2**-9, each exact in bf16,
  reduce to exactly 1 + 2**-9; a bf16 reduction (`communication_data_type: bf16`) gives 1.
* Scaled as the trainer assumes: the start-up probe refuses a DeepSpeed whose hook divides by the accumulation
  steps under `backward(scale_wrt_gas=False)` (DeepSpeed 0.18.3), and passes in every probe above.
"""

from __future__ import annotations

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
