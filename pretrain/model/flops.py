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


def attention_flops_per_pair(cfg: ModelConfig) -> float:
    """Training FLOPs of one (query, key) pair summed over the layers: q.k and the weighted sum of v cost
    2 * n_heads * head_dim each in forward, and backward twice that, so 12 * n_layers * n_heads * head_dim."""
    return 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "full") -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 * N for the matrix multiplies, where N counts every parameter except the input embedding (a lookup, no
    FLOPs) and includes the output projection even when it is tied to the embedding; plus the attention scores
    and their weighted sum, `attention_flops_per_pair` for every (query, key) pair. `attention="full"` counts
    the whole T x T square, seq_len pairs per token (PaLM / Chinchilla's convention, the one `perf/mfu` uses);
    `attention="causal"` counts the causal half, seq_len / 2 per token (Megatron's convention), which is
    closer to what causal kernels compute. Norm weights are in N but negligible.
    """
    if attention not in ("full", "causal"):
        raise ValueError(f"attention must be 'full' or 'causal', got {attention!r}")
    non_embedding = count_parameters(cfg) - cfg.vocab_size * cfg.dim
    if cfg.tie_embeddings:  # the shared matrix was subtracted above but still serves as the output projection
        non_embedding += cfg.vocab_size * cfg.dim
    pairs_per_token = seq_len if attention == "full" else seq_len / 2
    return 6.0 * non_embedding + attention_flops_per_pair(cfg) * pairs_per_token


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs (forward + backward) of a model at one sequence length, in two attention conventions.

    `full` counts every (query, key) pair of the T x T square (PaLM's convention, comparable across papers that
    use it); `computed` counts only the pairs a causal kernel works on: T^2 / 2 per sequence, or, with packed
    documents, the sum of each document's length squared over 2, which is what FlexAttention's document mask
    skips down to. At long sequences the two differ a lot (the 7B at 32K: the full square is more than 6N).
    """

    dense_per_token: float  # 6N: every matrix multiply but attention's
    per_attention_pair: float  # 12 * n_layers * n_heads * head_dim
    seq_len: int

    @classmethod
    def of(cls, cfg: ModelConfig, seq_len: int) -> ModelFlops:
        pair = attention_flops_per_pair(cfg)
        return cls(flops_per_token(cfg, seq_len) - pair * seq_len, pair, seq_len)

    def full(self, tokens: float) -> float:
        return tokens * (self.dense_per_token + self.per_attention_pair * self.seq_len)

    def computed(self, tokens: float, attended_pairs: float | None = None) -> float:
        """FLOPs of `tokens` tokens whose sequences attend `attended_pairs` pairs (None: T^2 / 2 a sequence)."""
        pairs = tokens * self.seq_len / 2 if attended_pairs is None else attended_pairs
        return tokens * self.dense_per_token + pairs * self.per_attention_pair


def attended_pairs(document_ids: torch.Tensor) -> float:
    """Sum over the documents of every row of length^2 / 2: the causal pairs document-masked attention keeps
    (a run of padding counts as one document, since the kernels compute it too)."""
    ids = document_ids.detach().to("cpu", torch.int64)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    lengths = torch.bincount(starts.reshape(-1).cumsum(0) - 1).double()
    return float((lengths**2).sum() / 2)
