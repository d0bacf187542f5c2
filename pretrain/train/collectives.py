"""The few collectives the trainer runs itself (counts, votes, run ids, file reports), on the process group the
engine joined; each is the identity outside a process group, so single-process tools and tests call them too."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats across ranks (validation loss, counters)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank (run ids, decisions taken by rank 0)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's Python object, in rank order, on every rank (the files each rank wrote into a checkpoint,
    rank 0's verdict on them)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
