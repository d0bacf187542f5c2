"""Throughput, FLOPs utilisation, memory and loss-spike detection for the step log (the FLOPs per token come
from `pretrain.model.flops`, the device peaks from `pretrain.planning.hardware`)."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque

import torch

from pretrain.model.flops import ModelFlops
from pretrain.model.moe import STAT_BALANCE, STAT_COUNTS, STAT_ENTROPY, STAT_Z
from pretrain.train.collectives import all_reduce_sum


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


class RouterStats:
    """The MoE layers' router statistics summed over a step's micro-batches, reported once per step.

    Each forward adds a [MoE layers, 3 + E] tensor (`pretrain.model.moe`: load-balancing loss, z-loss, router
    entropy, then tokens assigned to each expert). `take` averages the losses and the entropy over micro-batches
    and ranks, sums the assignments, and resets.
    """

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers  # the model's index of each MoE layer
        self.total: torch.Tensor | None = None
        self.forwards = 0

    def add(self, stats: torch.Tensor | None) -> None:
        if stats is None:
            return
        self.total = stats.detach().double() if self.total is None else self.total + stats.detach().double()
        self.forwards += 1

    def take(self, device: torch.device) -> dict[str, float]:
        """The step's metrics (identical on every rank): `moe/load_balance_loss`, `moe/z_loss`,
        `moe/router_entropy` (means over layers), `moe/max_load` (the busiest expert's assignments over the mean,
        worst layer; 1 = balanced) and per layer its max load and each expert's share of the assignments."""
        if self.total is None:
            return {}
        shape = self.total.shape
        summed = all_reduce_sum([*self.total.flatten().tolist(), float(self.forwards)], device)
        total = torch.tensor(summed[:-1], dtype=torch.float64).view(shape)
        means = total[:, :STAT_COUNTS] / summed[-1]
        counts = total[:, STAT_COUNTS:]
        shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        max_load = shares.max(dim=1).values * counts.shape[1]
        metrics = {
            "moe/load_balance_loss": float(means[:, STAT_BALANCE].mean()),
            "moe/z_loss": float(means[:, STAT_Z].mean()),
            "moe/router_entropy": float(means[:, STAT_ENTROPY].mean()),
            "moe/max_load": float(max_load.max()),
        }
        for row, layer in enumerate(self.layers):
            metrics[f"moe/max_load/layer{layer}"] = float(max_load[row])
            for expert, share in enumerate(shares[row].tolist()):
                metrics[f"moe/share/layer{layer}/expert{expert}"] = share
        self.total, self.forwards = None, 0
        return metrics
