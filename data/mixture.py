"""A weighted mixture of sources, with long documents mixed in as their own pool, addressed by global index.

Every source's documents are packed into a *pool* of sequences. With short-document dropping on
(`data.packing.short_doc_threshold > 0` and `short_doc_keep < 1`, see `data.length_mix`), a training pool holds
only its source's kept documents, which up-samples the long ones while the source keeps its weight. With
long-text mixing on (`data.packing.long_threshold > 0` and `long_share > 0`), (kept) documents of at least
`long_threshold` tokens leave their sources' pools and form one *long pool* across sources, packed
concat-and-chunk in shuffled document order and read in order, so each long document arrives as consecutive
sequences with nothing interleaved inside it (consecutive sequences overlap by one token, so no token of a
document loses its target at a cut); a document of at least `seq_len` tokens starts a fresh sequence and fills
whole ones, sharing only its tail (`data.length_mix.pack_long_aligned`).

A global sample index g maps to (pool, k) in O(1): a block of `MIXTURE_BLOCK` slots is apportioned among pools by
their shares (largest remainder), the slots of each pool spread evenly through the block, and the block repeats.
So the shares are exact per block and the order does not depend on world size or batch size. Within a short
pool, epoch e = k // n_seq reads the sequences in a permutation seeded by (seed, pool, e); the long pool is
re-packed per epoch in a document order seeded the same way.

Source weights are token shares: each short pool's sequence share is its weight divided by how full its
sequences are, so padding does not skew the mix. `long_share` is a share of sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from data.config import ConfigError, DataConfig
from data.interleave import apportion, interleave_block
from data.length_mix import (
    check_kept,
    describe_distribution,
    keep_mask,
    length_distribution,
    length_thresholds,
    pack_long_aligned,
)
from data.log import get_logger
from data.manifest import load_split
from data.packing import (
    ConcatDocumentStore,
    DocumentStore,
    PackedIndex,
    ShardDocumentStore,
    materialize,
    pack_documents,
)

if TYPE_CHECKING:
    from data.tokenizer import TokenizerInfo

log = get_logger(__name__)

MIXTURE_BLOCK = 10_000
LONG_POOL = "long_docs"
_LONG_TAG = 1_000_003  # keeps the long pool's seeds apart from the short pools' (pool index < this)
# 2: pieces of a split document overlap by one token, which changed every packing. Changes that move only some
# orders since (short-document dropping, the long pool's layout) enter the description only where they apply.
FINGERPRINT_VERSION = 2


@dataclass
class Pool:
    """The packed sequences one share of the mixture is drawn from."""

    name: str  # the source name, or LONG_POOL
    doc_ids: np.ndarray  # global document ids (into the mixture's concatenated store)
    index: PackedIndex  # epoch 0 packing (the long pool is re-packed per epoch)
    share: float = 0.0  # share of sequences
    block_count: int = 0  # slots per mixture block

    @property
    def n_seq(self) -> int:
        return self.index.n_sequences

    @property
    def fill(self) -> float:
        """Real tokens per sequence, as a fraction of the capacity."""
        return 1.0 - self.index.stats.padding_fraction if self.n_seq else 0.0


class MixtureDataset:
    """Packed, mixed training (or validation) samples: `dataset[g]` is the sample at global index g.

    Train: `len` is `planned_samples` (indices beyond it keep cycling epochs). Val: the pools are read one after
    another, each sequence exactly once, and `len` is the total. `stores` (source name -> DocumentStore) replaces
    reading shards, for tests and for `for_source`.
    """

    def __init__(
        self,
        config: DataConfig,
        *,
        pad_id: int,
        tokenizer_fingerprint: str | None,
        split: str = "train",
        planned_samples: int | None = None,
        stores: Mapping[str, DocumentStore] | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        config.validate()
        self.config = config
        self.split = split
        self.pad_id = pad_id
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.planned_samples = planned_samples
        self.capacity = config.packing.seq_len + 1
        self._lock = threading.Lock()
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        self._long_cache: dict[int, PackedIndex] = {}

        started = time.perf_counter()
        self._stores = dict(stores) if stores is not None else self._load_stores()
        missing = [name for name in config.sources if name not in self._stores]
        if missing:
            raise ValueError(f"no document store for source(s) {missing}")
        self.source_names = list(config.sources)
        self._store = ConcatDocumentStore([self._stores[name] for name in self.source_names])
        self._identities = [self._stores[name].identity() for name in self.source_names]
        self._kept = self._keep_mask()
        self.pools = self._build_pools()
        self._long_pool = next((i for i, p in enumerate(self.pools) if p.name == LONG_POOL), None)
        if split == "train":
            self._plan_train()
        else:
            self._val_offsets = np.concatenate([[0], np.cumsum([p.n_seq for p in self.pools])]).astype(
                np.int64
            )
            for pool in self.pools:
                pool.share = pool.n_seq / max(1, int(self._val_offsets[-1]))
        self._fingerprint = self._compute_fingerprint()
        elapsed = time.perf_counter() - started
        log.info(
            "mixture %s: %d pools packed in %.2f s, %d samples", split, len(self.pools), elapsed, len(self)
        )
        for pool in self.pools:
            log.info("  pool %s (share %.3f): %s", pool.name, pool.share, pool.index.stats.describe())
        if split == "train":
            for line in describe_distribution(self.length_distribution()):
                log.info("%s", line)

    @classmethod
    def from_tokenizer(
        cls,
        config: DataConfig,
        tokenizer: TokenizerInfo,
        *,
        split: str = "train",
        planned_samples: int | None = None,
    ) -> MixtureDataset:
        """Build from a `data.tokenizer.TokenizerInfo` (its pad id and fingerprint)."""
        return cls(
            config,
            pad_id=tokenizer.pad_id,
            tokenizer_fingerprint=tokenizer.fingerprint,
            split=split,
            planned_samples=planned_samples,
        )

    # ------------------------------------------------------------------------------------------- building

    def _load_stores(self) -> dict[str, DocumentStore]:
        stores: dict[str, DocumentStore] = {}
        for name in self.config.sources:
            shards = load_split(
                self.config.shards_dir, name, self.split, expected_fingerprint=self.tokenizer_fingerprint
            )
            stores[name] = ShardDocumentStore(shards)
        return stores

    @property
    def long_mixing(self) -> bool:
        packing = self.config.packing
        return packing.long_threshold > 0 and packing.long_share > 0

    @property
    def upsampling(self) -> bool:
        """Whether short training documents are dropped (never in validation: it sees the natural mix)."""
        packing = self.config.packing
        return self.split == "train" and packing.short_doc_threshold > 0 and packing.short_doc_keep < 1.0

    def _keep_mask(self) -> np.ndarray:
        """Which documents (global ids) are trained on: all, or each source's kept ones when up-sampling."""
        packing = self.config.packing
        return keep_mask(
            {name: self._stores[name].doc_lengths() for name in self.source_names},
            threshold=packing.short_doc_threshold if self.upsampling else 0,
            keep=packing.short_doc_keep,
            seed=self.config.seed,
        )

    def _build_pools(self) -> list[Pool]:
        packing = self.config.packing
        lengths = self._store.doc_lengths()
        is_long = (
            lengths >= packing.long_threshold if self.long_mixing else np.zeros(len(lengths), dtype=bool)
        )
        pools = []
        for i, name in enumerate(self.source_names):
            ids = np.arange(self._store.base[i], self._store.base[i + 1], dtype=np.int64)
            ids = ids[self._kept[ids] & ~is_long[ids]]
            index = pack_documents(
                lengths,
                self.capacity,
                mode=packing.mode,
                seed=[self.config.seed, i, 0],
                window_docs=packing.window_docs,
                doc_ids=ids,
            )
            pools.append(Pool(name, ids, index))
        if self.long_mixing:
            ids = np.flatnonzero(is_long & self._kept).astype(np.int64)
            pools.append(Pool(LONG_POOL, ids, self._pack_long(ids, lengths, epoch=0)))
        return pools

    def _pack_long(self, ids: np.ndarray, lengths: np.ndarray, epoch: int) -> PackedIndex:
        return pack_long_aligned(
            lengths, self.capacity, seed=[self.config.seed, _LONG_TAG, epoch], doc_ids=ids
        )

    def _plan_train(self) -> None:
        """Sequence shares per pool, the block layout, and the repetition check."""
        weights = np.array([self.config.sources[name].weight for name in self.source_names], dtype=np.float64)
        long_share = self.config.packing.long_share if self.long_mixing else 0.0
        threshold = self.config.packing.long_threshold
        below = f" below data.packing.long_threshold={threshold} tokens" if long_share else ""
        for name, pool in zip(self.source_names, self.pools, strict=False):  # the long pool comes last
            if pool.n_seq == 0 and self.upsampling:
                check_kept(
                    name, self.source_doc_lengths(name), self.source_kept(name), self.config, self.split
                )
            if pool.n_seq == 0:
                raise ConfigError(
                    f"data.sources.{name}: no {self.split} documents{below} in {self.config.shards_dir}/{name}; "
                    "re-run `python -m data.prepare` with this data config or remove the source"
                    + (", or raise data.packing.long_threshold" if long_share else "")
                )
        fills = np.array([self.pools[i].fill for i in range(len(self.source_names))])
        short = weights / fills
        shares = list((1.0 - long_share) * short / short.sum())
        if self._long_pool is not None:
            if self.pools[self._long_pool].n_seq == 0:
                raise ConfigError(
                    f"data.packing.long_share={long_share}: no {self.split} document has at least "
                    f"data.packing.long_threshold={self.config.packing.long_threshold} tokens; lower the threshold "
                    "or set data.packing.long_share=0"
                )
            shares.append(long_share)
        counts = apportion(np.array(shares), MIXTURE_BLOCK)
        for pool, share, count in zip(self.pools, shares, counts, strict=True):
            pool.share, pool.block_count = float(share), int(count)
            if count == 0:
                raise ConfigError(
                    f"pool {pool.name}: share {share:.2e} is below one sample in {MIXTURE_BLOCK}; raise its weight "
                    "or remove the source"
                )
        self._block_pool, self._block_rank = interleave_block(counts)
        if self.planned_samples is not None:
            self._check_repetition(self.planned_samples)

    def plan_samples(self, planned_samples: int) -> None:
        """Re-plan for the first `planned_samples` samples (length and repetition check; the order does not
        depend on it): a stage that continues its parent's data reads up to the parent's position plus its own."""
        self.planned_samples = planned_samples
        self._check_repetition(planned_samples)

    def samples_per_pool(self, n_samples: int) -> np.ndarray:
        """How many of the first `n_samples` global samples each pool supplies (train)."""
        full, rest = divmod(n_samples, MIXTURE_BLOCK)
        counts = np.array([p.block_count for p in self.pools], dtype=np.int64) * full
        counts += np.bincount(self._block_pool[:rest], minlength=len(self.pools))
        return counts

    def _check_repetition(self, planned: int) -> None:
        limit = self.config.max_repetition
        for pool, needed in zip(self.pools, self.samples_per_pool(planned), strict=True):
            epochs = needed / pool.n_seq
            if epochs <= limit:
                continue
            if pool.name == LONG_POOL:
                what = (
                    f"data.packing.long_share={self.config.packing.long_share}: the long pool (documents of at "
                    f"least {self.config.packing.long_threshold} tokens, all sources)"
                )
                fix = "lower data.packing.long_share or data.packing.long_threshold"
            else:
                what = f"data.sources.{pool.name} (weight {self.config.sources[pool.name].weight})"
                fix = f"lower data.sources.{pool.name}.weight, add data to the source"
            if self.upsampling:
                what += f" after dropping short documents ({len(pool.doc_ids)} left in its pool)"
                fix += ", raise data.packing.short_doc_keep or lower data.packing.short_doc_threshold"
            message = (
                f"{what} needs {needed} of {planned} planned samples ({pool.share:.1%}) from a pool of "
                f"{pool.n_seq} packed sequences ({pool.index.stats.n_tokens} tokens): {epochs:.2f} epochs, more "
                f"than data.max_repetition={limit}. To fix: {fix}, train on fewer tokens, raise "
                "data.max_repetition, or set data.repetition_policy=warn"
            )
            if self.config.repetition_policy == "error":
                raise ConfigError(message)
            log.warning(message)

    def _compute_fingerprint(self) -> str:
        packing = dataclasses.asdict(self.config.packing)
        keys = {key: packing.pop(key) for key in ("short_doc_threshold", "short_doc_keep")}
        description = {
            "version": FINGERPRINT_VERSION,
            "split": self.split,
            "seed": self.config.seed,
            "add_bos": self.config.add_bos,
            "packing": packing,
            "block": MIXTURE_BLOCK,
            "pad_id": self.pad_id,
            "tokenizer": self.tokenizer_fingerprint,
            "sources": [
                {"name": name, "weight": self.config.sources[name].weight, "documents": identity}
                for name, identity in zip(self.source_names, self._identities, strict=True)
            ],
        }
        if self.upsampling:
            description["short_docs"] = {**keys, "draw": "splitmix64(seed, source, index)"}
        if self.long_mixing:
            description["long_layout"] = "whole_sequences"
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------------------------------- lookup

    def fingerprint(self) -> str:
        """What defines the sample order (config, tokenizer, shard contents); stored with the loader state."""
        return self._fingerprint

    def __len__(self) -> int:
        if self.split == "val":
            return int(self._val_offsets[-1])
        if self.planned_samples is not None:
            return self.planned_samples
        return sum(p.n_seq for p in self.pools)

    def locate(self, index: int) -> tuple[int, int]:
        """(pool, k): global sample `index` is the k-th sample drawn from that pool."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if self.split == "val":
            if index >= len(self):
                raise IndexError(f"validation sample {index} out of range [0, {len(self)})")
            pool = int(np.searchsorted(self._val_offsets, index, side="right")) - 1
            return pool, index - int(self._val_offsets[pool])
        block, slot = divmod(index, MIXTURE_BLOCK)
        pool = int(self._block_pool[slot])
        return pool, block * self.pools[pool].block_count + int(self._block_rank[slot])

    def _sequence(self, pool_id: int, k: int) -> tuple[PackedIndex, int]:
        """The packed index and sequence number of the k-th sample of a pool."""
        pool = self.pools[pool_id]
        epoch, j = divmod(k, pool.n_seq)
        if self.split == "val":
            return pool.index, j
        if pool_id == self._long_pool:
            return self._long_index(epoch), j
        return pool.index, int(self._permutation(pool_id, epoch)[j])

    def _permutation(self, pool_id: int, epoch: int) -> np.ndarray:
        with self._lock:
            cached = self._perm_cache.get(pool_id)
            if cached is None or cached[0] != epoch:
                rng = np.random.default_rng([self.config.seed, pool_id, epoch])
                cached = (epoch, rng.permutation(self.pools[pool_id].n_seq))
                self._perm_cache[pool_id] = cached
            return cached[1]

    def _long_index(self, epoch: int) -> PackedIndex:
        if epoch == 0:
            return self.pools[self._long_pool].index
        with self._lock:
            if epoch not in self._long_cache:
                pool = self.pools[self._long_pool]
                if len(self._long_cache) >= 2:
                    self._long_cache.pop(min(self._long_cache))
                self._long_cache[epoch] = self._pack_long(pool.doc_ids, self._store.doc_lengths(), epoch)
            return self._long_cache[epoch]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        packed, seq = self._sequence(*self.locate(index))
        return materialize(self._store, packed, seq, self.pad_id)

    def source_name(self, index: int) -> str:
        """The source of sample `index`, or LONG_POOL for the long pool (which mixes sources)."""
        return self.pools[self.locate(index)[0]].name

    def source_doc_lengths(self, name: str) -> np.ndarray:
        """Token counts of a source's documents in this split (indexed like `describe_sample`'s documents)."""
        return self._stores[name].doc_lengths()

    def source_kept(self, name: str) -> np.ndarray:
        """Which of a source's documents in this split are trained on (indexed like `source_doc_lengths`)."""
        i = self.source_names.index(name)
        return self._kept[int(self._store.base[i]) : int(self._store.base[i + 1])].copy()

    def length_distribution(self, thresholds: list[int] | None = None) -> dict:
        """The share of tokens in documents of at least each threshold, per source and overall, before and after
        up-sampling, and as the pools train it (`data.length_mix.length_distribution` says what each means)."""
        packing = self.config.packing
        upsampling = (packing.short_doc_threshold, packing.short_doc_keep) if self.upsampling else None
        lengths, sources = self._store.doc_lengths(), self.config.sources
        return length_distribution(
            {
                n: (self.source_doc_lengths(n), self.source_kept(n), sources[n].weight)
                for n in self.source_names
            },
            [(pool.share * pool.fill, lengths[pool.doc_ids]) for pool in self.pools],
            thresholds or length_thresholds(packing.seq_len, upsampling[0] if upsampling else 0),
            upsampling=upsampling,
            long_pool=self._long_pool is not None,
        )

    def describe_sample(self, index: int) -> list[tuple[str, int, int, int]]:
        """The segments of sample `index`: (source, document index within the source's split, start, length)."""
        packed, seq = self._sequence(*self.locate(index))
        described = []
        for doc, start, length in zip(*packed.segments(seq), strict=True):
            owner = int(self._store.store_of(int(doc)))
            local = int(doc - self._store.base[owner])
            described.append((self.source_names[owner], local, int(start), int(length)))
        return described

    def for_source(self, name: str) -> MixtureDataset:
        """The same split of one source alone (weight 1, same packing), e.g. for per-source validation."""
        if name not in self.config.sources:
            raise KeyError(f"unknown source {name!r}; sources are {self.source_names}")
        source = dataclasses.replace(self.config.sources[name], weight=1.0)
        config = dataclasses.replace(self.config, sources={name: source})
        return MixtureDataset(
            config,
            pad_id=self.pad_id,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            split=self.split,
            stores={name: self._stores[name]},
        )
