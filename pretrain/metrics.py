"""Throughput, FLOPs utilisation, memory and loss-spike detection for the step log."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

# Dense BF16 peak TFLOP/s per device (no sparsity), matched against torch.cuda.get_device_name(), the longest
# key first: the SXM boards report a bare "H100" / "H200" (e.g. "NVIDIA H100 80GB HBM3"), the others say so.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H200 NVL": 835.0,
    "A100": 312.0,  # SXM and PCIe alike
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def peak_for_device(name: str) -> float | None:
    """The dense BF16 peak of a device by its reported name, or None when the table does not know it."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_tflops(override: float = 0.0) -> float | None:
    """The device's dense BF16 peak, from the override or the table; None on CPU or an unknown device."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_for_device(torch.cuda.get_device_name())


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
        from pretrain.model import attention_flops_per_pair, flops_per_token

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


def memory_gib() -> dict[str, float]:
    """Peak accelerator memory allocated, or the process's peak RSS on CPU, in GiB."""
    if torch.cuda.is_available():
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"memory/peak_rss_gib": rss * scale / 2**30}


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the interval since the previous report.

    Every figure is named after its attention convention: `_full_attention` counts the whole T x T square
    (PaLM's); `_computed_attention` (when given a `ModelFlops`) counts the causal pairs only, per document
    when `add` gets the batch's attended pairs, which is the work really done.
    """

    def __init__(self, flops_per_token: float | ModelFlops, world_size: int, peak: float | None):
        self.flops = flops_per_token if isinstance(flops_per_token, ModelFlops) else None
        self.flops_per_token = self.flops.full(1) if self.flops else float(flops_per_token)
        self.world_size = world_size
        self.peak = peak
        self._tokens = 0
        self._computed = 0.0
        self._start = time.perf_counter()

    def add(self, tokens: int, attended_pairs: float | None = None) -> None:
        """Count `tokens` tokens; `attended_pairs` (see `attended_pairs`) makes the computed figure exact."""
        self._tokens += tokens
        if self.flops:
            self._computed += self.flops.computed(tokens, attended_pairs)

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        out = {"perf/tokens_per_s": tokens_per_s, "perf/tflops_per_device_full_attention": tflops}
        if self.flops:
            out["perf/tflops_per_device_computed_attention"] = (
                self._computed / elapsed / self.world_size / 1e12
            )
        if self.peak:
            for key in [k for k in out if k.startswith("perf/tflops_per_device")]:
                out[key.replace("tflops_per_device", "mfu")] = out[key] / self.peak
        self._tokens, self._computed, self._start = 0, 0.0, now
        return out


class SpikeDetector:
    """Flags a loss more than `sigma` standard deviations above the mean of the last `window` losses."""

    def __init__(self, window: int, sigma: float):
        self.history: deque[float] = deque(maxlen=window)
        self.sigma = sigma

    def update(self, loss: float) -> bool:
        spike = False
        if len(self.history) == self.history.maxlen:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            spike = loss > mean + self.sigma * max(std, 1e-6)
        if math.isfinite(loss):
            self.history.append(loss)
        return spike
