"""The key/value cache of incremental decoding, and what it costs in memory.

Generation prefills the prompt once, then feeds one token per step; the cache keeps every layer's keys and values
so a step costs one position, not the whole prefix. Its memory is linear in the positions it can hold, so it is
sized to the prompt plus the new tokens, never to the model's whole window by default.
"""

from __future__ import annotations

import torch

from pretrain.model.config import ModelConfig


def kv_cache_bytes_per_token(cfg: ModelConfig, element_bytes: int) -> int:
    """Cache memory per position and sequence: keys and values of every layer, 2 * L * kv_heads * head_dim."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * element_bytes


class KVCache:
    """Keys and values of the first `length` positions of every layer, for incremental decoding (no grad).

    Preallocated for `capacity` positions so decoding appends in place; rows of the batch advance together.
    Size it to what will be decoded (prompt + new tokens): it takes `kv_cache_bytes_per_token` per position, so
    a model's whole window is far more than a short generation needs (the 7B at 32K in fp32: 32 GiB). The
    storage is allocated at the first `append`, in `dtype` or else the dtype of the first keys (bf16 under
    autocast, half of an fp32 cache).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.capacity = capacity or cfg.max_seq_len
        self.shape = (cfg.n_layers, batch, cfg.kv_heads, self.capacity, cfg.head_dim)
        self.device, self.dtype = device, dtype
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, head_dim] after the cached positions; return every key and value so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions exceed its capacity of {self.capacity}")
        if self.keys is None or self.values is None:
            dtype, device = self.dtype or k.dtype, self.device or k.device
            self.keys = torch.zeros(self.shape, device=device, dtype=dtype)
            self.values = torch.zeros(self.shape, device=device, dtype=dtype)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
