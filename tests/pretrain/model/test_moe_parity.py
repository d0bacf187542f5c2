"""Loss parity of our trainer, with Mixture-of-Experts layers, with a plain PyTorch loop over transformers' Mixtral.

The dense comparison of `test_parity` (same batches, LR formula, AdamW groups, clipping, tolerances) with every
feed-forward block of the debug model made 4 experts of width 88, top-2, and router-loss coefficients large
enough to move the gradient (load balance 0.1, z-loss 0.01). The reference is `MixtralForCausalLM` (eager
attention, the additive document mask) loaded with the trainer's initial weights; its objective is the summed
cross-entropy over the global batch's targets / their count, plus the router losses computed from the papers'
formulas on transformers' own router logits, per global micro-batch (the rows one backward of the trainer
sees), averaged over layers and then micro-batches: the normalisation the trainer documents.

Cases: 1 rank with one micro-batch of 8 sequences, and 2 ZeRO-3 ranks with micro-batches of 2 (2 accumulation
steps per rank, 4 micro-batches per step). Asserted per step: `train/loss` and `train/grad_norm` (which carries
the router losses' gradient) within 1e-4 relative of the reference, the logged `moe/load_balance_loss` within 1e-4
of the reference's, the same target tokens; after 20 steps the consolidated weights within 1e-5 relative in norm.
A trainer that dropped the router losses, or averaged them over ranks' micro-batches differently, is off by more
(checked by mutation: dropping the 1 / accumulation factor moves the grad norm by 0.17 relative and the
loss by 7e-4 with accumulation). The test also caught the router keeping PyTorch's default init under ZeRO-3
(initialized after `zero.Init` had partitioned it): the first step's loss was 3e-3 off.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pretrain.checkpoint import newest_weights
from pretrain.config import compose_pretrain_config
from pretrain.evaluation.export import hf_name
from tests.helpers import read_metrics, run_pretrain
from tests.pretrain.model.test_parity import (
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    OVERRIDES,
    STEPS,
    WEIGHTS_RTOL,
    reference_run,
    relative,
    weights_difference,
)

pytest.importorskip("transformers")

MOE = (
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_ffn_dim=88",
    "model.moe.load_balance_coef=0.1",
    "model.moe.z_loss_coef=0.01",
)
# name: (ranks, micro-batch, gradient accumulation steps) for 8 sequences per global batch
CASES = {"moe-1rank": (1, 8, 1), "moe-2ranks-accum2": (2, 2, 2)}


@pytest.fixture(scope="module")
def moe_parity(debug_artifacts, tmp_path_factory):
    """Both trainer runs as subprocesses (one thread each) while this process computes each case's reference."""
    runs = tmp_path_factory.mktemp("moe-parity-runs")
    cfg = compose_pretrain_config(
        ["+experiment=debug", f"paths.artifacts={debug_artifacts}", *OVERRIDES, *MOE]
    )
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        jobs = [
            pool.submit(
                run_pretrain, debug_artifacts, runs, *OVERRIDES, *MOE, f"train.run_name={name}",
                f"train.local_processes={ranks}", f"train.micro_batch_size={micro}",
                env={"OMP_NUM_THREADS": "1"},
            )
            for name, (ranks, micro, _) in CASES.items()
        ]  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            references = {name: reference_run(cfg, micro) for name, (_, micro, _) in CASES.items()}
        finally:
            torch.set_num_threads(threads)
        for job in jobs:
            job.result()
    return cfg, references, runs


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_moe_trainer_losses_equal_a_plain_transformers_mixtral_loop(moe_parity, case):
    cfg, references, runs = moe_parity
    ref, run_dir = references[case], runs / case
    _, _, accumulation = CASES[case]
    logged = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert all(m["train/grad_accum"] == accumulation for m in logged)
    assert [int(m["train/target_tokens"]) for m in logged] == ref.targets, "different batches"

    loss_diffs = [relative(m["train/loss"], w) for m, w in zip(logged, ref.losses, strict=True)]
    norm_diffs = [relative(m["train/grad_norm"], w) for m, w in zip(logged, ref.grad_norms, strict=True)]
    balance_diffs = [
        relative(m["moe/load_balance_loss"], w) for m, w in zip(logged, ref.balances, strict=True)
    ]
    checkpoint, trained = newest_weights(run_dir)
    assert checkpoint.step == STEPS
    assert sorted(hf_name(n) for n in trained) == sorted(ref.final)
    weights_diff = weights_difference(trained, ref.final, hf_name)
    print(
        f"\nMoE parity {case}: max relative difference: loss {max(loss_diffs):.2e}, grad norm"
        f" {max(norm_diffs):.2e}, balance loss {max(balance_diffs):.2e}, final weights {weights_diff:.2e}"
    )
    assert max(ref.balances) > 1.0  # the routing is not trivially balanced
    assert max(loss_diffs) <= LOSS_RTOL, loss_diffs
    assert max(norm_diffs) <= GRAD_NORM_RTOL, norm_diffs
    assert max(balance_diffs) <= 1e-4, balance_diffs
    assert weights_diff <= WEIGHTS_RTOL, weights_diff
    assert cfg.model.moe.enabled
