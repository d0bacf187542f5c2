"""The key/value cache of incremental decoding, and what it costs in memory.

Generation prefills the prompt once, then feeds one token per step; the cache keeps every layer's keys and values
so a step costs one position, not the whole prefix. Its memory is linear in the positions it holds, so it is
sized to the prompt plus the new tokens, never to the model's whole window by default. A model with a sliding
window W never looks further back than W - 1 tokens, so its cache is a ring of W slots: memory stays flat
however long the generation runs past W.
"""

from __future__ import annotations

import torch

from pretrain.model.config import ModelConfig

# The mask value that lets every query see every key given: one new token decoding against the whole cache.
ATTEND_ALL = "attend_all"


def kv_cache_bytes_per_token(cfg: ModelConfig, element_bytes: int) -> int:
    """Cache memory per position and sequence: keys and values of every layer, 2 * L * kv_heads * head_dim."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * element_bytes


def kv_cache_bytes(cfg: ModelConfig, positions: int, batch: int = 1, element_bytes: int = 2) -> int:
    """Memory of a cache for `positions` positions: all of them, or at most the sliding window's W slots."""
    slots = positions if cfg.sliding_window is None else min(positions, cfg.sliding_window)
    return batch * slots * kv_cache_bytes_per_token(cfg, element_bytes)


class KVCache:
    """Keys and values of the positions decoded so far, for every layer (no grad).

    `capacity` bounds the positions a generation may reach (prompt + new tokens; default the model's window);
    rows of the batch advance together. Storage is preallocated so decoding writes in place: `capacity` slots,
    or, for a model with a sliding window W shorter than that, a ring of W slots where position p lives in slot
    p % W (keys carry their rotation already, so where a key sits does not matter to attention). The storage is
    allocated at the first `append`, in `dtype` or else the dtype of the first keys (bf16 under autocast).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        ring: bool = True,
    ) -> None:
        self.capacity = capacity or cfg.max_seq_len
        self.window = cfg.sliding_window
        # `ring=False` keeps every position even for a windowed model (the window is then a mask only).
        self.rolling = ring and self.window is not None and self.capacity > self.window
        self.slots = self.window if self.rolling else self.capacity
        self.shape = (cfg.n_layers, batch, cfg.kv_heads, self.slots, cfg.head_dim)
        self.device, self.dtype = device, dtype
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def first_visible(self) -> int:
        """The oldest cached position the next query can still see (0 unless the window has moved on)."""
        if not self.rolling:
            return 0
        return max(0, self.length - (self.window - 1))

    def attention_mask(self, length: int, device: torch.device) -> torch.Tensor | str | None:
        """The mask of `length` new queries against the keys `append` will return for them.

        None when plain causal attention is right (a prefill within the window), ATTEND_ALL for one new token
        (every returned key is within its reach), else a boolean [1, 1, length, keys] mask: causal, and with a
        window at most W - 1 tokens back.
        """
        past, first = self.length, self.first_visible()
        if past == 0 and (self.window is None or length <= self.window):
            return None
        if length == 1 and (self.window is None or past - first < self.window):
            return ATTEND_ALL
        queries = torch.arange(past, past + length, device=device)[:, None]
        keys = torch.arange(first, past + length, device=device)[None, :]
        keep = keys <= queries
        if self.window is not None:
            keep = keep & (queries - keys < self.window)
        return keep[None, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, head_dim] after the cached positions; return the keys and values the new
        queries attend over: every cached one (or, with a window, those from `first_visible()` on), in order of
        position, then the new ones."""
        start, new = self.length, k.shape[2]
        end = start + new
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions exceed its capacity of {self.capacity}")
        if self.keys is None or self.values is None:
            dtype, device = self.dtype or k.dtype, self.device or k.device
            self.keys = torch.zeros(self.shape, device=device, dtype=dtype)
            self.values = torch.zeros(self.shape, device=device, dtype=dtype)
        if not self.rolling:
            self.keys[layer, :, :, start:end] = k
            self.values[layer, :, :, start:end] = v
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        visible = torch.arange(self.first_visible(), start, device=self.keys.device) % self.slots
        past_k = self.keys[layer].index_select(2, visible)  # copies, before the ring is overwritten
        past_v = self.values[layer].index_select(2, visible)
        kept = min(new, self.slots)  # of a chunk longer than the ring only its last W positions stay
        slots = torch.arange(end - kept, end, device=self.keys.device) % self.slots
        self.keys[layer].index_copy_(2, slots, k[:, :, new - kept :].to(self.keys.dtype))
        self.values[layer].index_copy_(2, slots, v[:, :, new - kept :].to(self.values.dtype))
        return torch.cat([past_k, k.to(past_k.dtype)], dim=2), torch.cat([past_v, v.to(past_v.dtype)], dim=2)
