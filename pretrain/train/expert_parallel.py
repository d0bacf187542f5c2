"""Expert parallelism for our MoE layers with DeepSpeed AutoEP (`deepspeed.expert_parallel_size`).

AutoEP replaces each MoE feed-forward at `deepspeed.initialize` by its own layer, whose experts are split over
groups of `expert_parallel_size` ranks (tokens travel to their experts and back by all-to-all; the other
parameters stay under plain ZeRO-3). It reads our layout as it is: the router's `weight` [E, D] and the experts'
fused `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F]. Its layer routes as ours (softmax over the experts,
top-k, renormalised over the k: the softmax over the top-k logits) but returns only the output, so the block
computes our router losses from the logits of AutoEP's router gate, made to compute in fp32 as ours
(`Block.router_losses_from`).

Names change under AutoEP (`mlp.router.gate.weight`, `mlp.experts.w1/w2/w3` with gate and up split), and so do
its checkpoints: `zero_to_fp32` refuses them and `pretrain.checkpoint.weights` reads their universal copy.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import torch
import torch.nn.functional as F

from data.log import get_logger
from pretrain.checkpoint import find_checkpoint
from pretrain.checkpoint.run_dir import RunDir
from pretrain.checkpoint.weights import has_expert_parallel_layers
from pretrain.config import ConfigError, PretrainConfig
from pretrain.model.moe import MoEFeedForward
from pretrain.model.transformer import Transformer

log = get_logger(__name__)


def autoep_config(cfg: PretrainConfig) -> dict[str, Any]:
    """DeepSpeed AutoEP's block for our MoE layers: each `layers.<i>.mlp` with an `experts` child (the dense
    blocks have none and are left alone) is replaced by AutoEP's layer, its router copied from `router.weight`
    and its experts from our fused `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F] (transformers' Mixtral
    layout); routing as ours: softmax, top-k, renormalised over the k."""
    moe = cfg.model.moe
    return {
        "enabled": True,
        "autoep_size": cfg.deepspeed.expert_parallel_size,
        "moe_layer_pattern": r"layers\.\d+\.mlp",
        "router_pattern": "router",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj",
        "expert_w3": None,
        "top_k": moe.top_k,
        "score_func": "softmax",
        "score_apply": "post",
        "route_norm": True,
    }


def attach_expert_parallel_routers(model: Transformer) -> bool:
    """After `deepspeed.initialize`: where AutoEP replaced an MoE layer (its layer returns only the output),
    its router gate computes the logits in fp32 as ours does (AutoEP's runs in the weights' dtype, so in bf16
    some near-tie tokens would pick other experts than our layer picks), and the block computes the router
    losses from those logits. Whether any layer was replaced."""
    replaced = []
    for block in model.layers:
        if block.is_moe and not isinstance(block.mlp, MoEFeedForward):
            gate = block.mlp.router.gate
            gate.forward = functools.partial(_fp32_linear, gate)
            block.router_losses_from(gate)
            replaced.append(type(block.mlp).__name__)
    if replaced:
        log.info(
            "expert parallelism: %d MoE layers replaced by DeepSpeed AutoEP's %s", len(replaced), replaced[0]
        )
    return bool(replaced)


def _fp32_linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def check_checkpoint_layout(cfg: PretrainConfig) -> None:
    """Refuse to resume (or to start a stage from a parent) across expert parallelism switched on or off: AutoEP's
    checkpoints name and split the experts differently, so the load would fail on every checkpoint and the run
    would look broken. Changing N (and the world size) is fine; the universal copy re-slices the experts."""
    committed = RunDir(cfg.run_dir).committed()
    if committed:
        sources, what = committed[::-1], "this run's checkpoints were"
    elif cfg.train.init_from:
        sources = [find_checkpoint(cfg.train.init_from).path]
        what = "the parent's checkpoint (train.init_from) was"
    else:
        return
    for source in sources:  # the newest whose model states read (a broken one is the resume's business)
        try:
            written_with = has_expert_parallel_layers(source, missing_ok=False)
            break
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # missing or truncated
            continue
    else:
        return
    if written_with != bool(cfg.deepspeed.expert_parallel_size):
        raise ConfigError(
            f"deepspeed.expert_parallel_size: {what} written {'with' if written_with else 'without'} expert "
            f"parallelism ({source}), and this run has it {'on' if not written_with else 'off'}; keep it "
            f"{'on (any size that divides the experts and ranks)' if written_with else 'off (0)'} for this run"
        )
