"""Our MoE layer against transformers' Mixtral sparse block, forward + backward, same weights and shapes.

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json

For fp32 and bf16 (weights and activations in that dtype, as under DeepSpeed's bf16), times one forward and
backward of a batch of tokens through:

* `ours`: `pretrain.model.moe.MoEFeedForward` as the trainer runs it (tokens sorted by expert, one grouped GEMM
  per projection where `torch._grouped_mm` runs, plus the load-balancing and z-losses);
* `ours_loop`: the same with the experts run one slice at a time (what runs where the grouped GEMM does not);
* `hf_eager`: `MixtralSparseMoeBlock`, transformers' default experts (a loop over the experts hit, a gather and
  an index_add per expert);
* `hf_grouped_mm`: the same block with `experts_implementation="grouped_mm"`.

Each case copies the same router and expert weights; the outputs are checked against `hf_eager` first, in norm
of the difference over the norm of the output, on the tokens that both routers send to the same experts (fp32:
1e-5; bf16: 2e-2). Our router computes its logits in fp32, transformers' in the weights' dtype, so in bf16 a
share of near-tie tokens picks another expert; that share is reported. Times are medians over `--iters` runs after `--warmup`, on `torch.get_num_threads()`
threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pretrain.evaluation.export import mixtral_config
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.moe import MoEFeedForward


def model_config(args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_dim=args.expert_ffn)
    return ModelConfig(
        name="bench", vocab_size=256, dim=args.dim, n_layers=1, n_heads=8, n_kv_heads=8,
        ffn_dim=args.expert_ffn, max_seq_len=args.tokens, moe=moe,
    )  # fmt: skip


def hf_block(cfg: ModelConfig, ours: MoEFeedForward, implementation: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(**mixtral_config(cfg, 1, 2, 0, "float32"), experts_implementation=implementation)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        block.experts.down_proj.copy_(ours.experts.down_proj)
    return block


def forward_backward(name: str, layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().requires_grad_()
    out = layer(x)
    if name.startswith("ours"):
        out, router_loss, _ = out
        ((out * upstream).sum() + router_loss).backward()
    else:
        (out * upstream).sum().backward()
    return out.detach()


def time_case(name, layer, x, upstream, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        forward_backward(name, layer, x, upstream)
    times = []
    for _ in range(iters):
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward_backward(name, layer, x, upstream)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = model_config(args)
    torch.manual_seed(0)
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("tokens", "dim", "experts", "top_k", "expert_ffn")},
        "ms": {},
    }
    base = MoEFeedForward(cfg)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ours = MoEFeedForward(cfg)
        ours.load_state_dict(base.state_dict())
        loop = MoEFeedForward(cfg)
        loop.load_state_dict(base.state_dict())
        loop.experts.forward = lambda tokens, counts, e=loop.experts: type(e).forward(
            e, tokens, counts, False
        )
        layers = {
            "ours": ours,
            "ours_loop": loop,
            "hf_eager": hf_block(cfg, base, "eager"),
            "hf_grouped_mm": hf_block(cfg, base, "grouped_mm"),
        }
        x = torch.randn(1, args.tokens, args.dim).to(dtype)
        upstream = torch.randn(1, args.tokens, args.dim).to(dtype)
        for layer in layers.values():
            layer.to(dtype)
        want = forward_backward("hf_eager", layers["hf_eager"], x, upstream).float()
        label = str(dtype).removeprefix("torch.")
        with torch.no_grad():
            ours_experts = ours.route(x.reshape(-1, args.dim))[1].sort(dim=-1).values
            hf_experts = layers["hf_eager"].gate(x.reshape(-1, args.dim))[2].sort(dim=-1).values
        same = (ours_experts == hf_experts).all(dim=-1)
        figures[f"tokens_routed_differently/{label}"] = round(1.0 - same.float().mean().item(), 4)
        want = want.reshape(-1, args.dim)[same]
        for name, layer in layers.items():
            got = forward_backward(name, layer, x, upstream).float().reshape(-1, args.dim)[same]
            error = ((got - want).norm() / want.norm()).item()
            assert error < tolerance, f"{name} {label}: output differs from transformers' by {error}"
            ms = 1e3 * time_case(name, layer, x, upstream, args.warmup, args.iters)
            figures["ms"][f"{name}/{label}"] = round(ms, 1)
            print(
                f"{label:9} {name:14} {ms:8.1f} ms  (relative difference to hf_eager {error:.1e})", flush=True
            )
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
