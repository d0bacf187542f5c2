"""A LLaMA-style decoder-only transformer, readable top to bottom.

Pre-norm RMSNorm, rotary position embeddings (RoPE; for long contexts a larger base, position interpolation or
YaRN), grouped-query attention, a SwiGLU feed-forward block, no biases and no dropout. Weight names and the
RoPE layout (rotate-half) follow Hugging Face's Llama, so an export is a rename and nothing more.

Packed batches carry `document_ids` and `position_ids`; attention then never crosses a document. With
`sliding_window` W (Mistral) a token also sees only the last W tokens, itself included; one predicate
(`keep_pair`) defines both. On CUDA this uses FlexAttention with that block mask (memory linear in the sequence length), compiled for a
bounded set of shapes (`pretrain.model.flex_compile`); elsewhere a boolean [B, 1, T, T] mask goes to
scaled_dot_product_attention, but only when some row really holds several documents: a batch of one document
per row is plain causal attention (`is_causal=True`), which SDPA runs with its flash or memory-efficient kernels.
An arbitrary mask rules flash out, and for grouped-query attention on CUDA that leaves the math kernel, which
builds the whole [B, H, T, S] score tensor.

For generation, a `KVCache` keeps past keys and values so each new token costs one position, not the whole
prefix (a ring of W slots for a windowed model); without a cache (training) nothing changes. The prefill is
causal attention without a mask (within the window), and a single new token attends to every key the cache
returns without a mask either.

Nothing here knows about DeepSpeed: the engine wraps the model, and activation checkpointing is injected from
outside through `Transformer.set_activation_checkpointing`. Every module initializes its own weights inside its
`__init__`, so building the model under `deepspeed.zero.Init` (which partitions each module's parameters as soon
as its `__init__` returns) yields correctly initialized shards without gathering anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.config import ModelConfig
from pretrain.model.flex_compile import BatchPadding, ShapeBoundedCompile, pad_rows
from pretrain.model.kv_cache import ATTEND_ALL, KVCache
from pretrain.model.moe import MoEFeedForward, router_terms
from pretrain.model.rope import Yarn, apply_rope, positions_from_documents, rope_tables

# Labels of positions without a target (padding, a document's first token): torch's cross_entropy default,
# and what `data.loader` writes (a test checks the two agree).
IGNORE_INDEX = -100

try:  # FlexAttention arrived in torch 2.5; without it the boolean-mask path is used everywhere.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    BlockMask = create_block_mask = flex_attention = None


class Linear(nn.Linear):
    """A bias-free linear layer initialized from normal(0, std) inside its own `__init__`."""

    def __init__(self, in_features: int, out_features: int, std: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        nn.init.normal_(self.weight, mean=0.0, std=std)


class Embedding(nn.Embedding):
    """A token embedding initialized from normal(0, std) inside its own `__init__`."""

    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        super().__init__(num_embeddings, dim)
        nn.init.normal_(self.weight, mean=0.0, std=std)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Hugging Face's Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


_compiled: dict[str, ShapeBoundedCompile] = {}
_flex_batches = BatchPadding()  # FlexAttention batches are padded up to the largest seen at their length


def _on_cuda(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """`fn` compiled on CUDA (eager FlexAttention and eager block masks materialize T x T tensors), for a
    bounded number of input shapes: a shape past the budget raises instead of silently running eagerly."""
    if device.type != "cuda":
        return fn
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = ShapeBoundedCompile(fn)
    return _compiled[fn.__name__]


def has_document_boundary(document_ids: torch.Tensor) -> bool:
    """Whether some row holds more than one document (padding counts as one): only then is a mask needed."""
    return bool((document_ids[:, 1:] != document_ids[:, :-1]).any())


def keep_pair(document_ids: torch.Tensor | None, window: int | None) -> Callable[..., torch.Tensor]:
    """The one definition of which (query, key) pairs attention keeps, as a FlexAttention `mask_mod`: causal,
    within the query's document (when `document_ids` are given) and, with a window W, at most W - 1 tokens
    back (W keys, the query's own included, as transformers' Mistral). Called with broadcastable index
    tensors it gives the dense mask, so the block mask and SDPA's boolean mask cannot disagree."""

    def keep(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        kept = q_idx >= kv_idx
        if window is not None:
            kept = kept & (q_idx - kv_idx < window)
        if document_ids is not None:
            kept = kept & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return kept

    return keep


def dense_mask(
    keep: Callable[..., torch.Tensor], batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """`keep` evaluated on every (row, query, key): a boolean [batch, 1, length, length] mask for SDPA."""
    rows = torch.arange(batch, device=device)[:, None, None]
    index = torch.arange(length, device=device)
    return keep(rows, None, index[None, :, None], index[None, None, :])[:, None]


def attention_mask(
    cfg: ModelConfig,
    length: int,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> Any:
    """The attention mask of a training batch: None (plain causal), a FlexAttention BlockMask, or a bool
    [B or 1, 1, T, T], for causal attention within each document and the model's sliding window.

    Padding (document id -1) attends only to earlier padding, so no row is ever fully masked. A BlockMask may
    have more rows than the batch: a smaller batch is padded with padding rows up to the largest batch seen at
    its length, so the tail batches of an evaluation reuse the compiled kernel of the full ones.
    """
    window = cfg.sliding_window if cfg.windowed(length) else None
    if document_ids is not None:
        device = document_ids.device
    elif window is None:
        return None  # one document a row, nothing out of the window: plain causal attention
    device = torch.device("cpu") if device is None else torch.device(device)
    use_flex = flex_attention is not None and (
        cfg.attention == "flex" or (cfg.attention == "auto" and device.type == "cuda")
    )
    if use_flex:
        rows = None  # without documents the mask is the same for every row
        ids = None
        if document_ids is not None:
            rows = _flex_batches.pad_batch(document_ids.shape[0], (length, str(device)))
            ids = pad_rows(document_ids, rows, -1)
        make_mask = _on_cuda(create_block_mask, device)
        return make_mask(keep_pair(ids, window), rows, None, length, length, device=device)
    if document_ids is not None and window is None and not has_document_boundary(document_ids):
        return None  # one document per row: plain causal attention, no mask
    batch = 1 if document_ids is None else document_ids.shape[0]
    return dense_mask(keep_pair(document_ids, window), batch, length, device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, d] over k, v [B, H_kv, S, d] (H a multiple of H_kv) under
    `mask` as `attention_mask` or a KV cache makes it: [B, H, T, d]."""
    gqa = k.shape[1] != q.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        batch, rows = q.shape[0], mask.shape[0]  # the mask may cover a padded batch (see attention_mask)
        q, k, v = pad_rows(q, rows), pad_rows(k, rows), pad_rows(v, rows)
        return _on_cuda(flex_attention, q.device)(q, k, v, block_mask=mask, enable_gqa=gqa)[:batch]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, str) and mask == ATTEND_ALL:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [B, T] of packed rows from their position ids alone: a document (and the padding run) starts
    exactly where its position id is 0 (`data.packing.materialize`), so they count those starts. Padding gets an
    id of its own rather than -1; it attends only to earlier padding either way."""
    return torch.cumsum(position_ids == 0, dim=1) - 1


@dataclass(frozen=True)
class SequenceSlice:
    """The `mask` of a forward on a sequence-parallel rank, which holds one slice of each sequence: no mask can be
    built from a slice, so each attention passes the slice's global position ids to its sequence-parallel core,
    which gathers the whole sequence and builds the mask there."""

    position_ids: torch.Tensor


# (attention module, q [B, H, T/SP, d], k and v [B, H_kv, T/SP, d] after RoPE, the slice's global position ids)
# -> the attention output of this rank's slice for o_proj [B, T/SP, H * d].
SequenceParallelAttention = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.layer_index = layer_index  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.k_proj = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.v_proj = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, out_std)
        # Set through `Transformer.set_sequence_parallel`: the core attention of a sequence-parallel rank.
        self.sequence_parallel: SequenceParallelAttention | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: KVCache | None = None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        if isinstance(mask, SequenceSlice):
            # This rank holds a slice of the sequence: the sequence-parallel core attends over the whole of it.
            assert self.sequence_parallel is not None, "set_sequence_parallel was not called"
            return self.o_proj(self.sequence_parallel(self, q, k, v, mask.position_ids))
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, cfg.init_std / math.sqrt(2 * cfg.n_layers))

        # Set from outside to run the SwiGLU in slices of the sequence (DeepSpeed's TiledMLP): called as
        # tiled(self, x) and expected to compute `swiglu` over x.
        self.tiled: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swiglu(x) if self.tiled is None else self.tiled(self, x)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)).

    The mlp is a SwiGLU, or in an MoE layer (`model.moe`) a router and experts; an MoE block then returns its
    router loss and statistics beside x, as outputs, so activation checkpointing keeps their gradient.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.moe.is_moe_layer(layer_index)
        self.mlp = MoEFeedForward(cfg) if self.is_moe else FeedForward(cfg)
        self.moe = cfg.moe
        self.captured_logits: list[torch.Tensor] = []  # see `router_losses_from`

    def router_losses_from(self, router: nn.Module) -> None:
        """`mlp` was replaced by a layer that routes as ours (softmax over the top-k logits) but returns only its
        output, e.g. DeepSpeed AutoEP's expert-parallel layer: capture the logits its `router` module outputs
        (the first output when it returns several) and compute the router losses and statistics from them
        here, as part of this block's forward, so activation checkpointing recomputes them with the layer."""

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.captured_logits.append(output[0] if isinstance(output, tuple) else output)

        router.register_forward_hook(capture)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: KVCache | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x))
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):
            out, router_loss, stats = out
        else:  # a replaced mlp: the losses from the logits its router just produced
            logits = self.captured_logits.pop()
            self.captured_logits.clear()
            router_loss, stats = router_terms(self.moe, logits.float().reshape(-1, logits.shape[-1]))
        return x + out, router_loss, stats


class Transformer(nn.Module):
    """The decoder: embeddings, `layers` (an nn.ModuleList of Blocks), a final norm and the output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, index) for index in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None
        self.checkpoint_every = 1
        self.sequence_parallel_size = 1  # see `set_sequence_parallel`
        # Of the last forward, with MoE layers: the weighted router losses averaged over those layers (with its
        # gradient; the trainer adds it to the objective) and their detached statistics [MoE layers, 3 + E].
        self.router_loss: torch.Tensor | None = None
        self.router_stats: torch.Tensor | None = None

    def set_activation_checkpointing(self, fn: Callable[..., torch.Tensor] | None, every_n: int = 1) -> None:
        """Recompute every `every_n`-th block in backward: forward calls `fn(block, x, cos, sin, mask)`.

        `fn` is e.g. `deepspeed.checkpointing.checkpoint` or `functools.partial(torch.utils.checkpoint.checkpoint,
        use_reentrant=False)`; None turns checkpointing off.
        """
        if every_n < 1:
            raise ValueError(f"every_n must be at least 1, got {every_n}")
        self.checkpoint_fn, self.checkpoint_every = fn, every_n

    def set_sequence_parallel(self, core: SequenceParallelAttention | None, size: int = 1) -> None:
        """Let forwards with `sequence_sliced=True` run on one slice of each sequence out of `size` (sequence
        parallelism): every attention then goes through `core`, which sees the whole sequence. Set from the
        training side (DeepSpeed-Ulysses); None turns it off. Other forwards (generation, evaluation) are unchanged.
        """
        for layer in self.layers:
            layer.attn.sequence_parallel = core
        self.sequence_parallel_size = size if core is not None else 1

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        sequence_sliced: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V], or with `labels` (IGNORE_INDEX skipped) the next-token cross-entropy: its mean
        over the targets, or with `reduction="sum"` its sum (the trainer normalises by the global batch).

        `labels` are already shifted: labels[:, t] is the target for the prediction at position t. With a
        `cache`, `input_ids` continue the cached sequence: positions start at `cache.length`, attention sees
        the cached keys too, and the cache grows by T. With `sequence_sliced` (sequence parallelism, see
        `set_sequence_parallel`) the inputs are this rank's slice of each sequence, with its global `position_ids`;
        the loss is then this slice's sum.
        """
        cfg = self.cfg
        batch, length = input_ids.shape
        if sequence_sliced:
            if self.sequence_parallel_size == 1 or cache is not None or position_ids is None:
                raise ValueError(
                    "a sequence-sliced forward needs set_sequence_parallel, the slice's global position_ids "
                    "and no KV cache"
                )
            length_whole = length * self.sequence_parallel_size
        else:
            length_whole = length
        if length_whole > cfg.max_seq_len:
            raise ValueError(f"sequence length {length_whole} exceeds model.max_seq_len={cfg.max_seq_len}")
        past = 0 if cache is None else cache.length
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids (packed batches) cannot be combined with a KV cache")
        if position_ids is None:
            if document_ids is None:
                positions = torch.arange(past, past + length, device=input_ids.device)
                position_ids = positions.expand(batch, length)
            else:
                position_ids = positions_from_documents(document_ids)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, Yarn.of(cfg))
        if sequence_sliced:
            mask = SequenceSlice(position_ids)
        elif cache is None:
            mask = attention_mask(cfg, length, document_ids, input_ids.device)
        else:
            mask = cache.attention_mask(length, input_ids.device)

        x = self.embed_tokens(input_ids)
        router_losses, router_stats = [], []
        for index, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, mask, cache)
            elif self.checkpoint_fn is not None and index % self.checkpoint_every == 0:
                x = self.checkpoint_fn(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
            if isinstance(x, tuple):  # an MoE layer
                x, router_loss, stats = x
                router_losses.append(router_loss)
                router_stats.append(stats)
        if router_losses:
            self.router_loss = torch.stack(router_losses).mean()
            self.router_stats = torch.stack(router_stats)
        if cache is not None:
            cache.length += length
        x = self.norm(x)
        if labels is None:
            return self.lm_head(x)
        total = self.loss(x, labels)
        if reduction == "sum":
            return total
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over the non-ignored labels, without fp32 logits for the whole batch.

        Rows are processed `loss_chunk_size` at a time; while training each chunk is recomputed in backward,
        so only the hidden states are kept, never a [B*T, V] tensor of logits or log-probabilities.
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        chunk = self.cfg.loss_chunk_size or hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            piece, targets = hidden[start : start + chunk], labels[start : start + chunk]
            if torch.is_grad_enabled() and chunk < hidden.shape[0]:
                total = total + checkpoint(self._loss_sum, piece, targets, use_reentrant=False)
            else:
                total = total + self._loss_sum(piece, targets)
        return total

    def _loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
