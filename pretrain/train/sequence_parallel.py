"""Sequence parallelism with DeepSpeed-Ulysses (`deepspeed.sequence_parallel_size`), and DeepSpeed's TiledMLP.

With SP > 1 the ranks form groups of SP consecutive ranks (DeepSpeed's `parallel_state_sp`); the world is
DP x SP. The loader reads whole sequences per data-parallel rank (rank // SP of world // SP), so the samples and
their order are those of any other factorisation of the same data-parallel batch, and each rank of a group then
keeps its contiguous slice of T / SP tokens of every sequence (`SequenceParallel.slice_batch`). Everything but
attention is per token and runs on the slice. Each attention goes through DeepSpeed's `UlyssesSPAttentionHF`: an
all-to-all trades the slices of q, k and v for the whole sequence on H / SP heads, attention runs there, and a
second all-to-all returns the output to the slices.

Ulysses drops the model's mask and gathers only the position ids, so the core attention handed to it
(`SequenceParallel._attend_whole`) rebuilds ours from the gathered global positions: causal, within each
document (documents start exactly where the position id is 0) and within the sliding window, through the same
`attention_mask` as an unsplit forward. RoPE is applied before the all-to-all on the slice's global positions.

Gradients: every rank's loss is the sum over its own slice's targets, and the trainer counts each target once
(on the rank that holds it), so the global batch's target count is the same as without SP. ZeRO-3's
reduce-scatter averages the gradients over every rank, SP ranks included, as without SP, so the engine's scale
(world size over that count) is unchanged; the start-up probe checks this on the run's own config and groups.
"""

from __future__ import annotations

from typing import Any

import torch

from data.log import get_logger
from pretrain.config import ConfigError, PretrainConfig
from pretrain.model.transformer import (
    FeedForward,
    Transformer,
    attend,
    attention_mask,
    documents_from_positions,
)
from pretrain.planning.memory_model import tiled_mlp_shards

log = get_logger(__name__)

SLICED_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def init_sequence_parallel(cfg: PretrainConfig, world_size: int) -> Any:
    """DeepSpeed's sequence-parallel groups (its `mpu` for `deepspeed.initialize`), or None without SP."""
    sp = cfg.deepspeed.sequence_parallel_size
    if sp == 1:
        return None
    if world_size % sp:
        raise ConfigError(
            f"deepspeed.sequence_parallel_size={sp} does not divide the {world_size} ranks: choose a divisor of the"
            " world size (each sequence-parallel group is SP consecutive ranks)"
        )
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=sp)
    log.info("sequence parallelism: %d groups of %d ranks (DeepSpeed-Ulysses)", world_size // sp, sp)
    return parallel_state_sp


def data_parallel(rank: int, world_size: int, sp: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of a rank: the groups are SP consecutive ranks."""
    return rank // sp, world_size // sp


def slice_sequences(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Slice `rank` of `size` contiguous slices of the sequence dimension of every row, after checking that
    documents start exactly where positions are 0 (which the core attention relies on to rebuild the document
    mask from gathered positions)."""
    positions, documents = batch["position_ids"], batch["document_ids"]
    length = positions.shape[1]
    if length % size:
        raise ValueError(f"sequence length {length} does not divide into {size} sequence-parallel slices")
    changes = documents[:, 1:] != documents[:, :-1]
    if not torch.equal(changes, positions[:, 1:] == 0) or bool((positions[:, 0] != 0).any()):
        raise ValueError(
            "sequence parallelism rebuilds document boundaries from position ids, but this batch has a document "
            "that does not start at position 0 (or a position 0 inside a document)"
        )
    part = length // size
    start = rank * part
    return {
        key: (value[:, start : start + part].contiguous() if key in SLICED_KEYS else value)
        for key, value in batch.items()
    }


class SequenceParallel:
    """One rank's part of sequence parallelism: its slice of each batch, and the model's attention through
    Ulysses. Built after `init_sequence_parallel`; size 1 leaves batches and model alone."""

    def __init__(self, cfg: PretrainConfig, mpu: Any) -> None:
        self.cfg = cfg.model
        self.size = cfg.deepspeed.sequence_parallel_size
        self.group = mpu.get_sequence_parallel_group() if mpu is not None else None
        self.rank = mpu.get_sequence_parallel_rank() if mpu is not None else 0
        # One UlyssesSPAttentionHF per micro-batch size (its shapes are fixed).
        self._ulysses: dict[int, Any] = {}
        # The slice whose whole-sequence mask `_mask` is, held so that its identity is never reused.
        self._slice_positions: torch.Tensor | None = None
        self._mask: Any = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def slice_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of every sequence of `batch` (the batch itself without SP)."""
        return slice_sequences(batch, self.rank, self.size) if self.enabled else batch

    def attach(self, model: Transformer) -> None:
        """Route the model's sequence-sliced forwards through Ulysses (after `deepspeed.initialize`)."""
        if self.enabled:
            model.set_sequence_parallel(self._attention, self.size)

    def _attention(
        self,
        module: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        # A new forward: every layer of one, and activation checkpointing's recompute, pass the same slice.
        if position_ids is not self._slice_positions:
            self._slice_positions, self._mask = position_ids, None
        out, _ = self._ulysses_for(q.shape[0])(module, q, k, v, None, position_ids=position_ids)
        return out  # [B, T / SP, H * d]

    def _ulysses_for(self, batch: int) -> Any:
        if batch not in self._ulysses:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            cfg = self.cfg
            self._ulysses[batch] = UlyssesSPAttentionHF(
                attn=self._attend_whole,
                batch_size=batch,
                attn_head_count=cfg.n_heads,
                attn_head_size=cfg.head_dim,
                kv_head_count=cfg.kv_heads,
                num_hidden_layers=cfg.n_layers,
                process_group=self.group,
                seq_length_is_variable=True,
            )
        return self._ulysses[batch]

    def _attend_whole(
        self,
        module: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        _dropped_mask: Any,
        *,
        position_ids: torch.Tensor,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        """Attention over the whole sequence on this rank's heads (Ulysses' `attn`): q [B, H/SP, T, d], position
        ids [B, T] gathered over the group; returns [B, T, H/SP, d]."""
        mask = self._whole_mask(position_ids)
        return attend(q, k, v, mask).transpose(1, 2), None

    def _whole_mask(self, position_ids: torch.Tensor) -> Any:
        """Our mask for the whole sequence, from its gathered position ids: built at the first layer of a forward
        and reused by the others and by activation checkpointing's recompute, which pass the same slice (keyed by
        identity, so no device sync)."""
        if self._mask is None:
            documents = documents_from_positions(position_ids)
            self._mask = attention_mask(self.cfg, position_ids.shape[1], documents, position_ids.device)
        return self._mask


def attach_tiled_mlp(model: Transformer, shards: int = 0) -> int:
    """Run every dense SwiGLU through DeepSpeed's TiledMLP over `shards` slices of this rank's tokens (0: about
    tokens / dim, `tiled_mlp_shards`): its forward keeps no [tokens, ffn] intermediate, its backward recomputes one
    slice at a time (ZeRO-3 told to take the weights' gradients after the last). Returns the MLPs tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(mlp: FeedForward, x: torch.Tensor) -> torch.Tensor:
        params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        return TiledMLP.apply(
            FeedForward.swiglu, mlp, x, tiled_mlp_shards(x.shape[0], x.shape[-2], x.shape[-1], shards), params
        )

    tiled_count = 0
    for layer in model.layers:
        if isinstance(layer.mlp, FeedForward):
            layer.mlp.tiled = tiled
            tiled_count += 1
    log.info("tiled MLP: %d SwiGLU layers run in slices of the sequence (DeepSpeed TiledMLP)", tiled_count)
    return tiled_count
