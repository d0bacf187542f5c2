"""Choices the engine makes for the hardware: the AdamW kernel on a GPU, activation recompute without RNG state."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.config import ModelConfig, compose_pretrain_config
from pretrain.model.transformer import Transformer
from pretrain.train import engine as eng

BETAS, EPS, LR, DECAY = (0.9, 0.95), 1e-8, 1e-2, 0.1


def adamw_by_hand(w: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Loshchilov and Hutter's AdamW as torch documents it, in float64: decoupled decay, bias-corrected moments."""
    w, m, v = (
        w.double().clone(),
        torch.zeros_like(w, dtype=torch.float64),
        torch.zeros_like(w, dtype=torch.float64),
    )
    for t, g in enumerate(grads, start=1):
        g = g.double()
        w = w * (1 - LR * DECAY)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        w = w - LR * m_hat / (v_hat.sqrt() + EPS)
    return w


def run_optimizer(make, w0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    w = torch.nn.Parameter(w0.clone())
    opt = make([{"params": [w], "weight_decay": DECAY}])
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def test_the_build_free_fused_adamw_makes_the_adamw_update():
    """torch's fused AdamW, the GPU default when DeepSpeed's FusedAdam was not prebuilt, runs on CPU too: the same
    update as the formula and as the foreach AdamW the CPU path uses (max error observed: about 1e-8)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=gen)
    grads = [torch.randn(64, 32, generator=gen) for _ in range(5)]
    kwargs = {"lr": LR, "betas": BETAS, "eps": EPS}
    fused = run_optimizer(lambda g: torch.optim.AdamW(g, fused=True, **kwargs), w0, grads)
    foreach = run_optimizer(lambda g: torch.optim.AdamW(g, foreach=True, **kwargs), w0, grads)
    expected = adamw_by_hand(w0, grads)
    assert (fused.double() - expected).abs().max().item() < 1e-6
    assert (foreach.double() - expected).abs().max().item() < 1e-6
    assert (fused - foreach).abs().max().item() < 1e-6


def test_on_a_gpu_without_a_prebuilt_fused_adam_the_engine_takes_torchs_fused_adamw(monkeypatch):
    cfg = compose_pretrain_config(["+experiment=debug"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    param = torch.nn.Parameter(torch.zeros(4, 4))
    opt = eng.build_optimizer(cfg, [{"params": [param], "weight_decay": 0.0}], fused_adam_prebuilt=False)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == tuple(cfg.optim.betas) and opt.defaults["lr"] == cfg.optim.lr


def test_the_prebuilt_check_reads_what_deepspeed_was_installed_with():
    from deepspeed.git_version_info import installed_ops

    assert eng.deepspeed_fused_adam_prebuilt() is bool(installed_ops["fused_adam"])


def model(checkpointing: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=32)
    net = Transformer(replace(cfg, loss_chunk_size=0)).float()
    if checkpointing:
        net.set_activation_checkpointing(eng._checkpoint_fn(), 1)
    return net


def test_recompute_keeps_no_rng_state_and_gives_the_uncheckpointed_gradient(monkeypatch):
    """The block has no randomness, so recompute without saved RNG state gives exactly the gradient of the
    model without checkpointing, and torch never reads the generator state for it (it would on every block
    with `preserve_rng_state=True`)."""
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    reads = []
    real = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or real())
    grads = {}
    for checkpointing in (False, True):
        net = model(checkpointing)
        torch.manual_seed(123 if checkpointing else 7)  # a different RNG state must not matter
        net(ids, labels=labels).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert reads == []
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_on_the_gpu_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=gen)
    grads = [torch.randn(64, 32, generator=gen) for _ in range(5)]
    kwargs = {"lr": LR, "betas": BETAS, "eps": EPS}
    got = run_optimizer(
        lambda g: torch.optim.AdamW(g, fused=True, **kwargs), w0.cuda(), [g.cuda() for g in grads]
    )
    assert (got.double().cpu() - adamw_by_hand(w0, grads)).abs().max().item() < 1e-6
