"""Where this rank stands in the job, read from whichever launcher started it, checked before any collective.

Our own launcher, torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address; srun sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID and leaves the address to the batch script
(`slurm/pretrain.sh` exports MASTER_ADDR/MASTER_PORT). Two things go wrong only on a cluster, so both are
decided here, where a test can set the environment on a CPU machine:

- the rendezvous address: a job whose ranks span several nodes and has no MASTER_ADDR would wait on
  127.0.0.1 until the collective timeout (30 minutes) instead of failing; it now fails at once, naming the
  variables;
- the GPU of a rank: where every task sees all GPUs of its node the rank takes GPU LOCAL_RANK, but sites that
  bind one GPU per task (`--gpus-per-task=1`, `--gpu-bind`) leave each task a single visible device, number 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from data.config import ConfigError

DEFAULT_MASTER_PORT = "29500"


class LaunchError(ConfigError):
    """The environment cannot start this rank; the message names the variables to set (reported in one line,
    like a wrong config value)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    # Ranks on this rank's node; 0 when no launcher said.
    local_world_size: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def _nodes(environ: Mapping[str, str]) -> int | None:
    """Nodes the job's ranks run on, where a launcher says (srun's step, or the allocation)."""
    for name in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        value = _int(environ, name)
        if value:
            return value
    return None


def launch_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) this rank needs,
    filled from `environ`: srun's SLURM_* where no launcher set RANK, defaults for a single process. Raises
    `LaunchError` for a multi-node job without a rendezvous address."""
    env = {
        k: environ[k]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if k in environ
    }
    if "RANK" not in env and "SLURM_PROCID" in environ:
        env["RANK"] = environ["SLURM_PROCID"]
        env["WORLD_SIZE"] = environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1"))
        env["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    if "MASTER_ADDR" not in env:
        world = int(env["WORLD_SIZE"])
        local = _int(environ, "LOCAL_WORLD_SIZE")
        nodes = _nodes(environ)
        if world > 1 and ((nodes is not None and nodes > 1) or (local is not None and local < world)):
            raise LaunchError(
                f"rank {env['RANK']} of {world} is one of several nodes' ranks, but MASTER_ADDR is not set, so"
                " the ranks cannot meet (each would wait on 127.0.0.1 until the timeout). Set MASTER_ADDR to"
                " the first node's host name and MASTER_PORT to a free port in the job script (under Slurm:"
                " `export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)`), or start"
                " the job with `sbatch slurm/pretrain.sh`, which sets both"
            )
        env["MASTER_ADDR"] = "127.0.0.1"  # every rank on this machine
    return env


def dist_env(environ: Mapping[str, str]) -> DistEnv:
    """This rank's place in the job from a launch environment (see `launch_environment`)."""
    local_world = _int(environ, "LOCAL_WORLD_SIZE") or _int(environ, "SLURM_NTASKS_PER_NODE") or 0
    return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]), local_world)


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device this rank drives: its local rank when the task sees every GPU of the node, device 0
    when the scheduler bound one GPU to the task (a single visible device)."""
    if visible_devices < 1:
        raise LaunchError(
            "no CUDA device is visible to this rank (check CUDA_VISIBLE_DEVICES and the job's --gpus)"
        )
    if visible_devices == 1:
        return 0
    if local_rank < visible_devices:
        return local_rank
    raise LaunchError(
        f"LOCAL_RANK={local_rank} but this task sees only {visible_devices} GPUs"
        f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most"
        f" {visible_devices} ranks per node, or give each task one GPU (srun --gpus-per-task=1)"
    )
