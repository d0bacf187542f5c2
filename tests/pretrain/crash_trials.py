"""Kill a checkpoint save at seeded random moments and check that loading never takes a partial checkpoint.

Run as `python -m tests.pretrain.crash_trials --dir D --trials N --seed S` (test_checkpoint_crash.py does).
The parent imports torch and DeepSpeed once and forks one child per trial (before any process group exists,
so nothing of gloo crosses the fork). Each child builds a real DeepSpeed ZeRO-3 engine (world size 1, gloo),
first loads the newest checkpoint exactly as a restarted job would and reports whether every part it loaded
belongs to one committed step (engine state, RNG and trainer state all carry the step number), then keeps
saving further steps with `CheckpointManager` until the parent SIGKILLs it after a seeded random delay, so
the kill lands anywhere in a save: inside DeepSpeed's writes, between files, before or after the commit
marker, during pruning. It prints one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

import torch

from pretrain.batching import batch_layout
from pretrain.checkpoint import CheckpointManager
from pretrain.config import compose_pretrain_config


def build_engine(cfg):
    from pretrain import engine as eng

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = eng.init_distributed(timeout_minutes=5)
    layout = batch_layout(
        512, cfg.data.packing.seq_len, cfg.train.micro_batch_size, 1, "train.global_batch_tokens"
    )
    return eng.TrainingEngine(cfg, env, layout)


def master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 master weights ZeRO-3 saves and restores (a test reaches into DeepSpeed's optimizer here)."""
    return list(engine.engine.optimizer.fp32_partitioned_groups_flat)


def stamp(engine, step: int) -> None:
    """Make every saved part say which step it belongs to."""
    for flat in master_partitions(engine):
        flat.data.fill_(float(step))
    torch.manual_seed(step)


def loaded_step_is_consistent(engine, state: dict) -> bool:
    step = state["step"]
    weights_ok = all(torch.all(flat == float(step)).item() for flat in master_partitions(engine))
    expected_rng = torch.Generator().manual_seed(step).get_state()
    return weights_ok and torch.equal(torch.get_rng_state(), expected_rng) and state["tokens"] == step * 512


def save_forever(engine, manager: CheckpointManager, first_step: int) -> None:
    step = first_step
    while True:
        stamp(engine, step)
        manager.save(engine, step, {"step": step, "tokens": step * 512, "loader": {}, "wandb_run_id": "x"})
        step += 1


def warm_imports() -> None:
    """Import here, once, what building an engine imports lazily, so each forked trial starts in a second."""
    import deepspeed  # noqa: F401
    import torch._dynamo  # noqa: F401

    for name in ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.stage3"):
        with contextlib.suppress(ImportError):  # another DeepSpeed version: the trials are only slower
            importlib.import_module(name)


def trial(cfg, directory: Path, report_fd: int) -> None:
    """In the child: load and check the newest checkpoint, report, then save until killed."""
    engine = build_engine(cfg)
    manager = CheckpointManager(directory, keep=2, rank=0, barrier=lambda: None, all_ranks_ok=lambda ok: ok)
    stamp(engine, 0)  # whatever is checked below must really have been loaded
    try:
        state = manager.load_latest(engine)
        verdict = (
            "none" if state is None else ("ok" if loaded_step_is_consistent(engine, state) else "partial")
        )
        step = state["step"] if state else 0
    except Exception as err:
        verdict, step = f"failed: {type(err).__name__}: {err}", 0
    os.write(report_fd, (json.dumps({"verdict": verdict, "step": step}) + "\n").encode())
    os.close(report_fd)
    save_forever(engine, manager, step + 1)


def run_child(cfg, directory: Path) -> tuple[int, int]:
    """Fork a trial; returns (pid, read end of its report pipe)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            trial(cfg, directory, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    return pid, read_fd


def read_report(read_fd: int) -> dict:
    with os.fdopen(read_fd) as pipe:
        line = pipe.readline()
    return json.loads(line) if line else {"verdict": "no report", "step": 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-delay", type=float, default=0.15, help="seconds of saving before the kill, at most"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_imports()

    cfg = compose_pretrain_config(["+experiment=debug", "train.micro_batch_size=8"])

    directory = Path(args.dir)
    rng = random.Random(args.seed)
    counts = {
        "trials": 0,
        "partial_loads": 0,
        "failed_loads": 0,
        "uncommitted_left": 0,
        "checkpoints_seen": 0,
    }
    steps = set()
    for index in range(args.trials + 1):
        pid, read_fd = run_child(cfg, directory)
        report = read_report(read_fd)  # arrives once the child has loaded, before it saves
        if index > 0:  # the first child finds nothing to load
            counts["trials"] += 1
            if report["verdict"] == "partial":
                counts["partial_loads"] += 1
            elif report["verdict"] != "ok":
                counts["failed_loads"] += 1
                print(report, flush=True)
            steps.add(report["step"])
        time.sleep(rng.uniform(0.0, args.max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    committed = {p.name for p in CheckpointManager(directory, 1, 0, lambda: None, lambda ok: ok).committed()}
    counts["uncommitted_left"] = sum(
        1 for p in (directory / "checkpoints").glob("step_*") if p.name not in committed
    )
    counts["checkpoints_seen"] = len(steps)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
