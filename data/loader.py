"""Global-batch loading by global sample index: each rank reads its slice, resumable to the exact sample.

The data position is the global index of the next sample, independent of world size and batch size: a global
batch of B samples at position p holds samples [p, p + B), and rank r of W reads rows
[p + r*B/W, p + (r+1)*B/W). So the union of the ranks' slices is the same global batch for any W, the batch size
may change between calls without skipping or repeating a sample, and resuming needs nothing but the position
(and a check that the dataset still produces the same order).
"""

from __future__ import annotations

import numbers
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import numpy as np
import torch

from data.log import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100
STATE_VERSION = 1
FINGERPRINT_POLICIES = ("error", "warn")


class SampleDataset(Protocol):
    """What the loader needs: samples by global index, and a fingerprint of the sample order."""

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...

    def fingerprint(self) -> str: ...


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack packed samples of seq_len + 1 tokens into inputs, shifted labels, positions and document ids.

    labels[t] = tokens[t + 1] when tokens t and t + 1 lie in the same segment (equal document ids, not -1), else
    -100. The prediction at t attends only to its own segment, so a target in the next segment (at a
    segment's last token) or in padding would be noise; the packers overlap a split document's pieces by one
    token so that masking the first token of each piece loses no target.
    """
    tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False)
    position_ids = np.stack([s["position_ids"] for s in samples]).astype(np.int64, copy=False)
    document_ids = np.stack([s["document_ids"] for s in samples]).astype(np.int32, copy=False)
    labels = tokens[:, 1:].copy()
    target_doc = document_ids[:, 1:]
    labels[(target_doc != document_ids[:, :-1]) | (target_doc < 0)] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(np.ascontiguousarray(position_ids[:, :-1])),
        "document_ids": torch.from_numpy(np.ascontiguousarray(document_ids[:, :-1])),
    }


def split_micro_batches(
    batch: dict[str, torch.Tensor], micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """A rank's batch as consecutive micro-batches of `micro_batch_size` rows (for gradient accumulation)."""
    rows = len(next(iter(batch.values())))
    if micro_batch_size < 1 or rows % micro_batch_size:
        raise ValueError(
            f"this rank's batch of {rows} rows does not split into micro-batches of {micro_batch_size}; "
            "choose a global batch size that is a multiple of micro_batch_size * world_size"
        )
    return [
        {k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, rows, micro_batch_size)
    ]


class GlobalBatchLoader:
    """This rank's slice of consecutive global batches of a dataset addressed by global sample index.

    With `prefetch`, a background thread builds the batch that the next call most likely asks for (same size,
    next position); it is used only when the call matches it exactly, so results never depend on timing.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        *,
        rank: int,
        world_size: int,
        prefetch: bool = False,
        fingerprint_policy: str = "error",
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}"
            )
        if fingerprint_policy not in FINGERPRINT_POLICIES:
            raise ValueError(
                f"fingerprint_policy must be one of {FINGERPRINT_POLICIES}, got {fingerprint_policy!r}"
            )
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.fingerprint_policy = fingerprint_policy
        self.position = 0
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch") if prefetch else None
        )
        self._pending: tuple[tuple[int, int], Future[dict[str, torch.Tensor]]] | None = None

    def rank_indices(self, global_batch_size: int, position: int | None = None) -> range:
        """Global sample indices of this rank's rows in the global batch starting at `position` (default: now)."""
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if global_batch_size % self.world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the world size {self.world_size}; "
                "choose a global batch size (and every step of a batch-size ramp) that is a multiple of the "
                "number of ranks"
            )
        start = self.position if position is None else position
        per_rank = global_batch_size // self.world_size
        return range(start + self.rank * per_rank, start + (self.rank + 1) * per_rank)

    def _build(self, global_batch_size: int, position: int) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.rank_indices(global_batch_size, position)])

    def next_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch [position, position + global_batch_size); advances position."""
        key = (self.position, global_batch_size)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            batch = pending[1].result()
        else:
            if pending is not None:  # a stale guess (the batch grew): never read the dataset from two threads
                pending[1].cancel()
                wait([pending[1]])
            batch = self._build(global_batch_size, self.position)
        self.position += global_batch_size
        if self._executor is not None:
            next_key = (self.position, global_batch_size)
            self._pending = (next_key, self._executor.submit(self._build, global_batch_size, self.position))
        return batch

    def _dataset_fingerprint(self) -> str | None:
        fingerprint = getattr(self.dataset, "fingerprint", None)
        return fingerprint() if callable(fingerprint) else None

    def state_dict(self) -> dict[str, Any]:
        """The position and the dataset's fingerprint; the same on every rank."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "dataset_fingerprint": self._dataset_fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; a changed dataset fingerprint errors (or warns, by policy)."""
        if not isinstance(state, dict) or "position" not in state:
            raise ValueError(f"not a data loader state (expected a dict with 'position'): {state!r}")
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        position = state["position"]
        if not isinstance(position, numbers.Integral) or isinstance(position, bool) or position < 0:
            raise ValueError(f"data loader state has an invalid position {position!r}")
        saved, current = state.get("dataset_fingerprint"), self._dataset_fingerprint()
        if saved is not None and current is not None and saved != current:
            message = (
                f"the data loader state was saved for dataset fingerprint {saved[:16]}…, but the dataset now has "
                f"{current[:16]}…: the data config (sources, weights, seed, packing), the tokenizer or the shards "
                f"changed since the checkpoint, so the samples from position {position} on differ from the "
                "interrupted run. Restore the original data config and shards to resume exactly, or load with "
                "fingerprint_policy='warn' to continue from that position with the new order"
            )
            if self.fingerprint_policy == "error":
                raise ValueError(message)
            log.warning(message)
        self._drop_pending()
        self.position = int(position)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            wait([self._pending[1]])
            self._pending = None

    def close(self) -> None:
        """Stop the prefetch thread (idempotent)."""
        self._drop_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> GlobalBatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
