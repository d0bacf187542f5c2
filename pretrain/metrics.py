"""Throughput, FLOPs utilisation, memory and loss-spike detection for the step log."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque

import torch

# Dense BF16 peak TFLOP/s per device (no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756 and is matched first below
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def peak_tflops(override: float = 0.0) -> float | None:
    """The device's dense BF16 peak, from the override or the table; None on CPU or an unknown device."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


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
    """Tokens/s, TFLOP/s per device and MFU over the interval since the previous report."""

    def __init__(self, flops_per_token: float, world_size: int, peak: float | None):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self._tokens = 0
        self._start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        out = {"perf/tokens_per_s": tokens_per_s, "perf/tflops_per_device": tflops}
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        self._tokens, self._start = 0, now
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
