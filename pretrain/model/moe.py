"""The Mixture-of-Experts feed-forward layer (Mixtral): a router and E SwiGLU experts, top-k per token, dropless.

For each token the router's logits (computed in fp32) pick the `top_k` experts; their outputs are summed with
weights given by a softmax over the chosen logits (Mixtral's renormalised top-k). The experts are two fused 3-D
tensors in transformers' Mixtral layout: `gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `down_proj`
[E, D, F]. That layout matters under ZeRO-3: each tensor is one parameter, gathered whole in every step, so
every expert takes part in every step on every rank whatever the routing (a ModuleList of experts that skips
the idle ones makes ranks disagree on which parameters to gather, and hangs). Tokens are sorted by expert and
multiplied in one grouped GEMM (`torch._grouped_mm`) where it runs, else by a loop over the experts' slices;
there is never a Python loop over tokens. No token is dropped (no capacity factor).

Two auxiliary losses keep the router healthy, both per layer over the tokens of the batch:
* load balancing (Switch Transformer): E * sum_e f_e * P_e, with f_e the share of the token-to-expert
  assignments that went to e and P_e the mean router probability of e; 1 at perfect balance, E when one expert
  takes everything. transformers' Mixtral counts f_e per token rather than per assignment, so its value is
  top_k times this one; Megatron-Core counts per assignment as here.
* router z-loss (ST-MoE): the mean of logsumexp(logits)^2, which keeps the logits small (fp32-safe).
The layer returns `load_balance_coef * balance + z_loss_coef * z` as a tensor with its gradient, beside detached
statistics for the step log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig, MoEConfig

# Columns of the statistics a layer returns, before the per-expert assignment counts.
STAT_BALANCE, STAT_Z, STAT_ENTROPY = 0, 1, 2
STAT_COUNTS = 3


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here: on the CPU (fp32 and bf16, torch >= 2.8), and on CUDA in bf16
    on Hopper or later; elsewhere the experts run one slice at a time."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """`x`, whose incoming gradient is made contiguous (grouped GEMM's backward refuses broadcast gradients)."""
    if x.requires_grad:
        x.register_hook(lambda grad: grad.contiguous())
    return x


def router_terms(
    moe: MoEConfig, logits: torch.Tensor, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weighted router loss, the detached statistics [3 + E]) of one layer's fp32 router logits [N, E];
    `counts` (assignments per expert) are recomputed from the logits' top-k when not given."""
    if counts is None:
        chosen = logits.detach().topk(moe.top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=moe.num_experts)
    probs = logits.softmax(dim=-1)
    share = counts.float() / counts.sum().clamp_min(1)  # f_e: share of the assignments
    balance = moe.num_experts * (share * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    router_loss = moe.load_balance_coef * balance + moe.z_loss_coef * z_loss
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
    stats = torch.cat([torch.stack([balance, z_loss, entropy]).detach(), counts.float()])
    return router_loss, stats


class Experts(nn.Module):
    """E SwiGLU experts as two fused tensors; `forward` takes tokens sorted by expert and the count of each."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        experts, width = cfg.moe.num_experts, cfg.expert_ffn_dim
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, cfg.dim))
        self.down_proj = nn.Parameter(torch.empty(experts, cfg.dim, width))
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=cfg.init_std)
        nn.init.normal_(self.down_proj, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(
        self, tokens: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None
    ) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for each token with its expert's weights; `tokens` [M, D] sorted by
        expert, `counts` [E] tokens per expert. `grouped` forces (True) or avoids (False) the grouped GEMM."""
        if grouped is None:
            grouped = grouped_mm_runs(tokens.device, tokens.dtype)
        if grouped:
            offsets = counts.cumsum(0).to(torch.int32)
            hidden = torch._grouped_mm(tokens, self.gate_up_proj.transpose(1, 2), offs=offsets)
            gate, up = _contiguous_grad(hidden).chunk(2, dim=-1)
            out = torch._grouped_mm(
                (F.silu(gate) * up).contiguous(), self.down_proj.transpose(1, 2), offs=offsets
            )
            return _contiguous_grad(out)
        pieces = []
        for expert, chunk in enumerate(torch.split(tokens, counts.tolist())):
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            pieces.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
        return torch.cat(pieces)


class Router(nn.Module):
    """The router's [E, D] weight, initialized from normal(0, init_std) inside its own `__init__`: under
    `deepspeed.zero.Init` a parameter is partitioned when the `__init__` that made it returns, so initializing
    it afterwards (from the parent) would silently leave the default init in place."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.dim))
        nn.init.normal_(self.weight, mean=0.0, std=cfg.init_std)


class MoEFeedForward(nn.Module):
    """Router + experts in place of a SwiGLU block; returns (output, weighted router loss, statistics)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.moe = cfg.moe
        self.num_experts, self.top_k = cfg.moe.num_experts, cfg.moe.top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fp32 router logits [N, E], top-k experts [N, k], their weights [N, k] summing to 1 per token)."""
        logits = F.linear(tokens.float(), self.router.weight.float())
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        return logits, top_experts, top_logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, top_experts, weights = self.route(tokens)
        # Dispatch: every (token, choice) assignment, sorted by expert, through the experts in one pass.
        assigned = top_experts.reshape(-1)
        order = assigned.argsort(stable=True)
        source = order // self.top_k  # the token of each sorted assignment
        counts = torch.bincount(assigned, minlength=self.num_experts)
        outputs = self.experts(tokens[source], counts)
        outputs = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, source, outputs.to(tokens.dtype))

        router_loss, stats = router_terms(self.moe, logits, counts)
        return combined.view(shape), router_loss, stats
