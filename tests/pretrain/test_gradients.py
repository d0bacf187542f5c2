"""The gradient the trainer applies is the anchors' gradient, measured on the real DeepSpeed ZeRO-3 engine.

* Accumulated in fp32: after 8 micro-batches of a bf16 model the accumulated gradient equals the fp32 sum of
  the micro-batch gradients to fp32 precision; accumulating in bf16 (`deepspeed.gradient_dtype=bf16`, what
  DeepSpeed does by default) is off by orders of magnitude more.
* Normalised per target token of the global batch: one batch with padding and masked targets gives the same
  gradient in fp32 for micro-batches of 1 and 4 rows and for 1 and 2 ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

PROBE = ROOT / "tests" / "pretrain" / "grad_probe.py"


def probe(tmp_path: Path, ranks: int, *args: str) -> dict:
    out = tmp_path / f"grads-{ranks}-{'-'.join(a.strip('-') for a in args)}.pt"
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
        str(PROBE), *args, "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
