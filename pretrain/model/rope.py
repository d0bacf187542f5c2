"""Rotary position embeddings (RoPE) in Hugging Face Llama's rotate-half layout, with the long-context variants:
a larger base, linear position interpolation and YaRN (NTK-by-parts frequencies and an attention temperature).

The tables are plain functions of the head size, base and positions, usable without a `ModelConfig`; positions
restart at every packed document, so each document is rotated as if it stood alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.model.config import ModelConfig


@dataclass(frozen=True)
class Yarn:
    """YaRN's settings besides its factor (`ModelConfig.rope_original_max_seq_len` and the `yarn_*` keys), in
    one value so that `rope_tables` stays usable without a ModelConfig and a missing one means no YaRN."""

    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    @classmethod
    def of(cls, cfg: ModelConfig) -> Yarn | None:
        """The model's YaRN settings, or None when it scales RoPE linearly (or not at all)."""
        if cfg.rope_type != "yarn":
            return None
        return cls(
            cfg.rope_original_max_seq_len, cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.yarn_attention_factor
        )


def rope_inverse_frequencies(
    head_dim: int, base: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The angle per position of each rotated pair, base^(-2i / head_dim) for i < head_dim / 2, in fp32,
    computed as transformers computes it so that an export rotates by the same rounded angles."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (base**exponents)


def yarn_frequencies(
    head_dim: int, base: float, factor: float, yarn: Yarn, device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies [head_dim / 2] and the factor it puts on cos and sin.

    Pair i turns original_max_seq_len * base^(-2i / head_dim) / (2 pi) times over the pretraining window. A
    pair that turns at least `beta_fast` times has already met every angle, so extrapolating it is safe and it
    is kept; one that turns at most `beta_slow` times would meet unseen angles past the window, so its
    frequency is divided by `factor` (position interpolation); the pairs in between blend linearly by index.
    The boundary indices are rounded outwards and clamped as Hugging Face (and YaRN's reference code) do, so
    an exported model rotates exactly as here. Interpolation flattens the attention distribution over long
    inputs; the attention factor (0.1 ln(factor) + 1 unless given) sharpens it back.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    wavelengths = base**exponents  # positions per radian of each pair (its wavelength / 2 pi)
    original, interpolated = 1.0 / wavelengths, 1.0 / (factor * wavelengths)

    def pair_turning(turns: float) -> float:
        """The (fractional) index of the pair that turns `turns` times over the pretraining window."""
        return head_dim * math.log(yarn.original_max_seq_len / (2 * math.pi * turns)) / (2 * math.log(base))

    first = max(math.floor(pair_turning(yarn.beta_fast)), 0)
    last = min(math.ceil(pair_turning(yarn.beta_slow)), head_dim - 1)
    width = (last - first) or 0.001  # one step when both bounds round to the same pair
    pairs = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    kept = 1 - ((pairs - first) / width).clamp(0, 1)  # share of the original frequency: 1 fast, 0 slow
    inv_freq = interpolated * (1 - kept) + original * kept
    attention = yarn.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, base: float, scaling: float = 1.0, yarn: Yarn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, head_dim] in fp32 for (possibly fractional) positions.

    Computed per batch from the positions rather than cached, which costs T * head_dim operations and keeps the
    model free of buffers (nothing to rebuild after meta-device construction, no length limit baked in).
    `base` is the effective base (a base change, ABF, is just a larger one). Without `yarn`, `scaling` is
    position interpolation: position p is rotated as p / scaling, by dividing the frequencies (the same
    angle, rounded as transformers rounds it). With `yarn`, `scaling` is YaRN's factor, and its attention
    factor multiplies cos and sin, so queries and keys carry it into the attention logits. A factor of 1.0 is
    plain RoPE either way, bit for bit.
    """
    if yarn is None or scaling == 1.0:
        inv_freq, attention = rope_inverse_frequencies(head_dim, base, position_ids.device) / scaling, 1.0
    else:
        inv_freq, attention = yarn_frequencies(head_dim, base, scaling, yarn, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    if attention == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention, angles.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] in the rotate-half layout, in fp32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return (x32 * cos + rotated * sin).to(x.dtype)


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along the sequence."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index
