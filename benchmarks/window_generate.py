"""Decoding past the window: the sliding-window model's ring KV cache against a cache that keeps everything.

    python benchmarks/window_generate.py --out benchmarks/results/window_generate.json

One randomly initialized model (the shape below; weights do not change the cost) decodes `--new` tokens
greedily after a short prompt, one token per forward with a KV cache, in three ways:

* `window_ring`: sliding window W, the cache a ring of W slots (what `generate` does for a windowed model);
* `window_full_cache`: the same model and weights, every position kept and the window applied by the mask
  (`KVCache(ring=False)`): the same tokens, the memory of a full cache;
* `full_attention`: the same weights without a window (another model: full attention, full cache), for the cost
  of attending to everything.

Reported per case: decode tokens/s (wall-clock over the whole decode, fp32, `torch.get_num_threads()` threads),
the KV cache's bytes at the end, and tokens/s over the first and the last quarter of the decode (flat for the
ring, falling for a cache that grows). The two windowed cases must produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from pretrain.model.config import ModelConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.transformer import Transformer


@torch.no_grad()
def decode(model: Transformer, prompt: torch.Tensor, new: int, ring: bool) -> dict:
    cache = KVCache(model.cfg, batch=1, capacity=prompt.shape[1] + new, ring=ring)
    step_input, tokens, stamps = prompt, [], []
    start = time.perf_counter()
    for _ in range(new):
        next_id = model(step_input, cache=cache)[:, -1].argmax(dim=-1)
        tokens.append(int(next_id))
        step_input = next_id.view(1, 1)
        stamps.append(time.perf_counter())
    quarter = new // 4
    return {
        "tokens": tokens,
        "tokens_per_s": round(new / (stamps[-1] - start), 1),
        "first_quarter_tokens_per_s": round(quarter / (stamps[quarter - 1] - start), 1),
        "last_quarter_tokens_per_s": round(quarter / (stamps[-1] - stamps[-quarter - 1]), 1),
        "kv_cache_bytes": cache.keys.nbytes + cache.values.nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--new", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = ModelConfig(
        name="window-bench", vocab_size=4096, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
        ffn_dim=4 * args.dim, max_seq_len=args.new + 16, sliding_window=args.window, loss_chunk_size=0,
    )  # fmt: skip
    torch.manual_seed(0)
    windowed = Transformer(cfg).eval()
    full = Transformer(replace(cfg, sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    cases = {
        "window_ring": decode(windowed, prompt, args.new, ring=True),
        "window_full_cache": decode(windowed, prompt, args.new, ring=False),
        "full_attention": decode(full, prompt, args.new, ring=True),
    }
    assert cases["window_ring"]["tokens"] == cases["window_full_cache"]["tokens"], (
        "the ring changed the tokens"
    )
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {"window": args.window, "new_tokens": args.new, "dim": args.dim, "layers": args.layers},
        "cases": {name: {k: v for k, v in c.items() if k != "tokens"} for name, c in cases.items()},
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
