"""Which parameters AdamW decays: the model's knowledge of its own parameters, read by the engine that builds the
optimizer and by the planner that sizes ZeRO-3's optimizer groups, so both see the same groups."""

from __future__ import annotations

import torch


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, decay_norms_and_embeddings: bool
) -> list[dict]:
    """AdamW groups: matrices decay; norms and embeddings only if configured (biases do not exist here)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Under zero.Init a parameter is a 1-D placeholder; its real shape is `ds_shape`.
        ndim = len(getattr(param, "ds_shape", param.shape))
        exempt = ndim < 2 or "embed" in name or "norm" in name
        (no_decay if exempt and not decay_norms_and_embeddings else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
