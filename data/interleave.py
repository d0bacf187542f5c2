"""Mixing pools by share, deterministically: which pool each slot of a repeating block of samples comes from.

A block of `MIXTURE_BLOCK` slots is apportioned among the pools by their shares (largest remainder), and each
pool's slots are spread evenly through the block, so a share is exact per block and a global sample index maps
to its pool in O(1), whatever the world size or the batch size.
"""

from __future__ import annotations

import numpy as np


def apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` proportional to `shares` (largest remainder, ties to lower index)."""
    exact = np.asarray(shares, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
    counts[order[:leftover]] += 1
    return counts


def interleave_block(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each slot of a block, its pool and its rank within the pool, each pool spread evenly."""
    pools = np.concatenate([np.full(c, p, dtype=np.int64) for p, c in enumerate(counts)])
    ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c > 0] or [np.zeros(0)])
    order = np.lexsort((pools, times))
    return pools[order], ranks[order]
