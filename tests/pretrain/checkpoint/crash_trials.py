"""Kill checkpoint saves at seeded random moments and check that loading never takes a partial checkpoint.

Run as `python -m tests.pretrain.checkpoint.crash_trials --dir D --trials N --ranks R --seed S` (test_checkpoint_crash.py
does). The parent imports torch and DeepSpeed once and, per trial, forks one child per rank (before any process
group exists, so nothing of gloo crosses the fork). The children form a real gloo group of R ranks, each
builds a real DeepSpeed ZeRO-3 engine, first loads the newest checkpoint exactly as a restarted job would (with
the real collectives) and reports whether every part it loaded belongs to one committed step (engine state,
its own RNG and trainer state all carry the step number), then keeps saving further steps with
`CheckpointManager` until the parent SIGKILLs the ranks after a seeded random delay, one rank first and the
others a moment later (as a launcher tears a job down after one rank dies), so the kills land anywhere in a
save: inside DeepSpeed's writes, between files, at the gathers, before or after the commit marker, during
pruning. The delay is drawn over a number of saves timed on this machine in the first trial (a fixed delay
would fall before the first commit on a slow CPU and after many saves on a fast one). Each trial must resume
exactly the newest committed step, or load nothing while nothing is committed. It prints one JSON line with
the counts.
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_engine(cfg, rank: int, world_size: int, port: int):
    from pretrain.train import engine as eng

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = eng.init_distributed(timeout_minutes=1)
    layout = batch_layout(
        512 * world_size,
        cfg.data.packing.seq_len,
        cfg.train.micro_batch_size,
        world_size,
        "train.global_batch_tokens",
    )
    return eng.TrainingEngine(cfg, env, layout)


def real_manager(directory: Path, rank: int, world_size: int, keep: int = 2) -> CheckpointManager:
    """A CheckpointManager with the trainer's real collectives."""
    from pretrain.train import collectives

    def all_ranks_ok(ok: bool) -> bool:
        return collectives.all_reduce_sum([0.0 if ok else 1.0], torch.device("cpu"))[0] == 0.0

    return CheckpointManager(
        directory,
        keep=keep,
        rank=rank,
        barrier=collectives.barrier,
        all_ranks_ok=all_ranks_ok,
        all_gather=collectives.all_gather_object,
        world_size=world_size,
    )


def master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 master weights ZeRO-3 saves and restores (a test reaches into DeepSpeed's optimizer here)."""
    return list(engine.deepspeed_engine.optimizer.fp32_partitioned_groups_flat)


def rng_seed(step: int, rank: int) -> int:
    """Each rank's RNG differs, so a rank that loaded another rank's RNG file is caught."""
    return step * 1000 + rank


def stamp(engine, step: int, rank: int = 0) -> None:
    """Make every saved part say which step it belongs to."""
    for flat in master_partitions(engine):
        flat.data.fill_(float(step))
    torch.manual_seed(rng_seed(step, rank))


def loaded_step_is_consistent(engine, state: dict, rank: int = 0) -> bool:
    step = state["step"]
    weights_ok = all(torch.all(flat == float(step)).item() for flat in master_partitions(engine))
    expected_rng = torch.Generator().manual_seed(rng_seed(step, rank)).get_state()
    return weights_ok and torch.equal(torch.get_rng_state(), expected_rng) and state["tokens"] == step * 512


def trainer_state(step: int) -> dict:
    return {"step": step, "tokens": step * 512, "loader": {}, "wandb_run_id": "x"}


def save_forever(engine, manager: CheckpointManager, first_step: int) -> None:
    step = first_step
    while True:
        stamp(engine, step, manager.rank)
        manager.save(engine, step, trainer_state(step))
        step += 1


def warm_imports() -> None:
    """Import here, once, what building an engine imports lazily, so each forked trial starts in a second."""
    import deepspeed  # noqa: F401
    import torch._dynamo  # noqa: F401

    for name in ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.stage3"):
        with contextlib.suppress(ImportError):  # another DeepSpeed version: the trials are only slower
            importlib.import_module(name)


def trial(cfg, directory: Path, report_fd: int, rank: int, world_size: int, port: int) -> None:
    """In one rank of a trial: load and check the newest checkpoint, report, then save until killed."""
    try:
        engine = build_engine(cfg, rank, world_size, port)
    except Exception as err:  # e.g. the port was taken between choosing and binding it: no load was tried
        os.write(
            report_fd,
            (json.dumps({"verdict": f"setup: {type(err).__name__}: {err}", "step": 0}) + "\n").encode(),
        )
        raise
    manager = real_manager(directory, rank, world_size)
    stamp(engine, 0, rank)  # whatever is checked below must really have been loaded
    try:
        state = manager.load_latest(engine)
        consistent = state is not None and loaded_step_is_consistent(engine, state, rank)
        verdict = "none" if state is None else ("ok" if consistent else "partial")
        step = state["step"] if state else 0
    except Exception as err:
        verdict, step = f"failed: {type(err).__name__}: {err}", 0
    os.write(report_fd, (json.dumps({"verdict": verdict, "step": step}) + "\n").encode())
    os.close(report_fd)
    save_forever(engine, manager, step + 1)


def run_child(cfg, directory: Path, rank: int, world_size: int, port: int) -> tuple[int, int]:
    """Fork one rank of a trial; returns (pid, read end of its report pipe)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            trial(cfg, directory, write_fd, rank, world_size, port)
        finally:
            os._exit(1)
    os.close(write_fd)
    return pid, read_fd


def newest_committed_step(directory: Path) -> int:
    """What a resume must load: the newest committed step (0 when none is committed yet)."""
    committed = CheckpointManager(directory, 1, 0, lambda: None, lambda ok: ok).committed()
    return int(committed[-1].name.split("_")[1]) if committed else 0


def kill_all(pids: list[int], rng: random.Random) -> None:
    """SIGKILL one rank, then the others a moment later (a few ms, in random order)."""
    order = rng.sample(pids, len(pids))
    for index, pid in enumerate(order):
        if index:
            time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)


def seconds_per_save(directory: Path, saves: int = 4, timeout: float = 300.0) -> float:
    """Time the first trial's saves, from its first commit over `saves` more, as the trials' time unit."""
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    while True:
        newest, now = newest_committed_step(directory), time.monotonic()
        if first is None and newest > 0:
            first = (now, newest)
        elif first is not None and newest >= first[1] + saves:
            return (now - first[0]) / (newest - first[1])
        if now > deadline:
            raise SystemExit(
                f"fewer than {saves + 1} saves committed in {timeout:.0f} s: the ranks are stuck"
            )
        time.sleep(0.002)


def verdict_of(reports: list[dict], newest: int) -> str:
    """`ok` when every rank loaded the newest committed step whole, or nothing while nothing is committed."""
    verdicts = {report["verdict"] for report in reports}
    loaded = {report["step"] for report in reports}
    if "partial" in verdicts:
        return "partial"
    expected = "none" if newest == 0 else "ok"
    if verdicts != {expected} or len(loaded) != 1:
        return "failed"
    return "ok" if loaded == {newest} else "not_newest"


def read_report(read_fd: int) -> dict:
    with os.fdopen(read_fd) as pipe:
        line = pipe.readline()
    return json.loads(line) if line else {"verdict": "no report", "step": 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=1, help="ranks per trial (a real gloo group)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--saves", type=float, default=8.0, help="time of saving before the kill, at most, in saves"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_imports()

    cfg = compose_pretrain_config(["+experiment=debug", "train.micro_batch_size=8"])

    directory = Path(args.dir)
    rng = random.Random(args.seed)
    counts = {
        "trials": 0,
        "ranks": args.ranks,
        "partial_loads": 0,
        "failed_loads": 0,
        "not_newest": 0,
        "uncommitted_left": 0,
        "checkpoints_seen": 0,
    }
    steps = set()
    for index in range(args.trials + 1):
        newest = newest_committed_step(directory)
        for _attempt in range(5):
            port = free_port()
            children = [run_child(cfg, directory, rank, args.ranks, port) for rank in range(args.ranks)]
            reports = [read_report(read_fd) for _, read_fd in children]  # each rank's, after loading
            if not any(report["verdict"].startswith("setup:") for report in reports):
                break
            # The ranks never formed their group (no checkpoint was read): not a trial of the load; again.
            print({"setup_failed": reports}, flush=True)
            kill_all([pid for pid, _ in children], random.Random(0))
        if index == 0:  # the first trial finds nothing to load; its saves set the time unit
            max_delay = args.saves * seconds_per_save(directory)
            print({"seconds_per_save": max_delay / args.saves}, flush=True)
        else:
            counts["trials"] += 1
            verdict = verdict_of(reports, newest)
            if verdict != "ok":
                counts[{"partial": "partial_loads", "failed": "failed_loads"}.get(verdict, verdict)] += 1
                print({"verdict": verdict, "newest_committed": newest, "reports": reports}, flush=True)
            steps |= {report["step"] for report in reports if report["step"]}
        time.sleep(rng.uniform(0.0, max_delay))
        kill_all([pid for pid, _ in children], rng)
    committed = {p.name for p in CheckpointManager(directory, 1, 0, lambda: None, lambda ok: ok).committed()}
    counts["uncommitted_left"] = sum(
        1 for p in (directory / "checkpoints").glob("step_*") if p.name not in committed
    )
    counts["checkpoints_seen"] = len(steps)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
