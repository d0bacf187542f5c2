"""One rank of a real 2-rank ZeRO-3 job that saves checkpoints while a file goes missing, for test_checkpoint.py.

Run as `python -m tests.pretrain.checkpoint.commit_probe --dir D --out O` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, once per rank. With the real gloo collectives and the real `CheckpointManager` it:

1. saves step 1 normally (committed);
2. saves step 2 while rank 0, right after the ranks reported their files, deletes rank 1's RNG file;
3. saves step 3 while rank 0, at the same moment, truncates rank 1's optimizer file;
4. saves step 4 normally, then (after the commit) deletes rank 1's RNG file of step 4 and resumes.

Each rank writes what it saw to `O/rank<R>.json`: the error of each damaged save, the marker of step 1, the
step it resumed and whether what it loaded is consistent; rank 0 also lists step 1's files as DeepSpeed left
them on disk (the oracle for the marker's per-rank sets).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import MARKER, CheckpointError, rng_file, tag_for
from pretrain.config import compose_pretrain_config
from pretrain.train import collectives
from pretrain.train import engine as eng
from tests.pretrain.checkpoint.crash_trials import (
    build_engine,
    loaded_step_is_consistent,
    master_partitions,
    real_manager,
    stamp,
    trainer_state,
)


def damaging_gather(rank: int, damage) -> Any:
    """The real all_gather; on rank 0, right after the first gather of a save (the ranks' file reports),
    `damage` hits rank 1's files, before rank 0 checks them."""
    calls = {"n": 0}

    def gather(obj: Any) -> list[Any]:
        gathered = collectives.all_gather_object(obj)
        calls["n"] += 1
        if rank == 0 and calls["n"] == 1:
            damage()
        return gathered

    return gather


def save_expecting_failure(manager, engine, step: int) -> str:
    try:
        manager.save(engine, step, trainer_state(step))
    except CheckpointError as err:
        return str(err)
    return "committed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="the run directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = compose_pretrain_config(["+experiment=debug", "train.micro_batch_size=8"])
    engine = build_engine(cfg, rank, world, int(os.environ["MASTER_PORT"]))
    run = Path(args.dir)
    manager = real_manager(run, rank, world, keep=3)
    seen: dict[str, Any] = {"own_files": engine.checkpoint_files()}

    stamp(engine, 1, rank)
    manager.save(engine, 1, trainer_state(1))
    step1 = run / "checkpoints" / tag_for(1)
    seen["marker_1"] = json.loads((step1 / MARKER).read_text())
    seen["files_on_disk_1"] = sorted(p.name for p in step1.iterdir() if p.name != MARKER)

    step2, step3 = (run / "checkpoints" / tag_for(s) for s in (2, 3))
    manager.all_gather = damaging_gather(rank, lambda: (step2 / rng_file(1)).unlink())
    stamp(engine, 2, rank)
    seen["save_2"] = save_expecting_failure(manager, engine, 2)
    seen["committed_2"] = (step2 / MARKER).exists()

    def truncate_rank1_optimizer() -> None:
        victim = next(step3.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        victim.write_bytes(victim.read_bytes()[:100])

    manager.all_gather = damaging_gather(rank, truncate_rank1_optimizer)
    stamp(engine, 3, rank)
    seen["save_3"] = save_expecting_failure(manager, engine, 3)
    seen["committed_3"] = (step3 / MARKER).exists()

    manager.all_gather = collectives.all_gather_object
    stamp(engine, 4, rank)
    manager.save(engine, 4, trainer_state(4))
    collectives.barrier()
    if rank == 0:
        (run / "checkpoints" / tag_for(4) / rng_file(1)).unlink()
    collectives.barrier()
    stamp(engine, 0, rank)  # what is checked below must really have been loaded
    state = manager.load_latest(engine)
    seen["resumed_step"] = state["step"] if state else None
    seen["consistent"] = state is not None and loaded_step_is_consistent(engine, state, rank)
    seen["weights_step"] = float(master_partitions(engine)[0].flatten()[0])
    collectives.barrier()
    seen["universal_dir"] = (run / "universal").exists()
    seen["broken"] = sorted(p.name for p in (run / "broken_checkpoints").glob("*"))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(seen, indent=1))
    eng.shutdown()


if __name__ == "__main__":
    main()
