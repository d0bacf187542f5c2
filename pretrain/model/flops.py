"""What a model costs: parameters counted on the meta device, and training FLOPs per token in the conventions
MFU is quoted in (the planner and the trainer's step log both read them here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.model.config import ModelConfig
from pretrain.model.transformer import Transformer


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model, counted on the meta device (no memory, works for any size); tied weights once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters a token goes through: all of them, less the experts it does not pick in each MoE layer
    ((num_experts - top_k) experts of 3 * dim * expert_ffn_dim weights each); what training FLOPs follow."""
    moe = cfg.moe
    idle_experts = sum(moe.is_moe_layer(i) for i in range(cfg.n_layers)) * (moe.num_experts - moe.top_k)
    return count_parameters(cfg) - idle_experts * 3 * cfg.dim * cfg.expert_ffn_dim


def attention_flops_per_pair(cfg: ModelConfig) -> float:
    """Training FLOPs of one (query, key) pair summed over the layers: q.k and the weighted sum of v cost
    2 * n_heads * head_dim each in forward, and backward twice that, so 12 * n_layers * n_heads * head_dim."""
    return 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim


def causal_pairs(length: float, window: int | None = None) -> float:
    """(query, key) pairs causal attention computes over one sequence of `length`: length^2 / 2, or with a
    sliding window W shorter than the sequence, the first W tokens' triangle plus W pairs for each later token."""
    if window is None or length <= window:
        return length * length / 2
    return window * window / 2 + (length - window) * window


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "full") -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 * N for the matrix multiplies, where N counts every active parameter (an MoE layer's chosen experts
    and router, not its idle experts) except the input embedding (a lookup, no FLOPs) and includes the output
    projection even when it is tied to the embedding; plus the attention scores
    and their weighted sum, `attention_flops_per_pair` for every (query, key) pair. `attention="full"` counts
    the whole T x T square, seq_len pairs per token (PaLM / Chinchilla's convention, the one `perf/mfu` uses);
    `attention="causal"` counts the causal half, seq_len / 2 per token (Megatron's convention), which is
    closer to what causal kernels compute. With a sliding window the square becomes the band of width W:
    "causal" counts `causal_pairs` per sequence and "full" twice that (so about 2W pairs per token past W).
    Norm weights are in N but negligible.
    """
    if attention not in ("full", "causal"):
        raise ValueError(f"attention must be 'full' or 'causal', got {attention!r}")
    non_embedding = count_active_parameters(cfg) - cfg.vocab_size * cfg.dim
    if cfg.tie_embeddings:  # the shared matrix was subtracted above but still serves as the output projection
        non_embedding += cfg.vocab_size * cfg.dim
    pairs_per_token = causal_pairs(seq_len, cfg.sliding_window) / seq_len
    if attention == "full":
        pairs_per_token *= 2
    return 6.0 * non_embedding + attention_flops_per_pair(cfg) * pairs_per_token


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs (forward + backward) of a model at one sequence length, in two attention conventions.

    `full` counts every (query, key) pair of the T x T square (PaLM's convention, comparable across papers that
    use it); `computed` counts only the pairs a causal kernel works on: T^2 / 2 per sequence, or, with packed
    documents, the sum of each document's length squared over 2, which is what FlexAttention's document mask
    skips down to. At long sequences the two differ a lot (the 7B at 32K: the full square is more than 6N). A
    sliding window narrows both to its band (`causal_pairs`).
    """

    dense_per_token: float  # 6N: every matrix multiply but attention's
    per_attention_pair: float  # 12 * n_layers * n_heads * head_dim
    seq_len: int
    window: int | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, seq_len: int) -> ModelFlops:
        pair = attention_flops_per_pair(cfg)
        full_pairs = 2 * causal_pairs(seq_len, cfg.sliding_window) / seq_len
        return cls(flops_per_token(cfg, seq_len) - pair * full_pairs, pair, seq_len, cfg.sliding_window)

    def full(self, tokens: float) -> float:
        pairs_per_token = 2 * causal_pairs(self.seq_len, self.window) / self.seq_len
        return tokens * (self.dense_per_token + self.per_attention_pair * pairs_per_token)

    def computed(self, tokens: float, attended_pairs: float | None = None) -> float:
        """FLOPs of `tokens` tokens whose sequences attend `attended_pairs` pairs (None: whole sequences of
        seq_len, `causal_pairs` each)."""
        if attended_pairs is None:
            attended_pairs = tokens * causal_pairs(self.seq_len, self.window) / self.seq_len
        return tokens * self.dense_per_token + attended_pairs * self.per_attention_pair


def attended_pairs(document_ids: torch.Tensor, window: int | None = None) -> float:
    """The causal pairs document-masked attention keeps: `causal_pairs` of every document of every row, in the
    sliding window when there is one (a run of padding counts as one document, since the kernels compute it)."""
    ids = document_ids.detach().to("cpu", torch.int64)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    lengths = torch.bincount(starts.reshape(-1).cumsum(0) - 1).double()
    pairs = lengths**2 / 2
    if window is not None:
        pairs = torch.where(lengths <= window, pairs, window * window / 2 + (lengths - window) * window)
    return float(pairs.sum())
