"""One rank of a resume-across-world-sizes probe (run by torchrun from tests/pretrain/checkpoint/test_reshard.py).

`save`: the real `TrainingEngine` (ZeRO-3, gloo) trains the debug model a few steps on fixed batches and
commits a checkpoint with `CheckpointManager`, then writes the gathered optimizer state. `load`: at any world
size, resumes the newest checkpoint exactly as the trainer does (converting it when the world size differs),
writes the gathered state again, and with `--then-save` trains one more step, commits a normal checkpoint and
writes the state it holds.

The gathered state holds, per parameter, the fp32 master weights and both Adam moments, plus every sub-group's
Adam step and every parameter group's hyperparameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data.loader import IGNORE_INDEX, split_micro_batches
from pretrain.batching import batch_layout
from pretrain.checkpoint import CheckpointManager
from pretrain.config import compose_pretrain_config
from pretrain.train import collectives
from pretrain.train import engine as eng

SEQUENCES, SEQ_LEN, MICRO = 8, 64, 2


def batch_for(step: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(4, vocab, (SEQUENCES, SEQ_LEN + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[:, ::7] = IGNORE_INDEX
    positions = torch.arange(SEQ_LEN).expand(SEQUENCES, SEQ_LEN).contiguous()
    return {
        "input_ids": tokens[:, :-1],
        "labels": labels,
        "position_ids": positions,
        "document_ids": torch.zeros(SEQUENCES, SEQ_LEN, dtype=torch.int64),
    }


def train_step(engine, env, step: int, vocab: int) -> None:
    layout = batch_layout(SEQUENCES * SEQ_LEN, SEQ_LEN, MICRO, env.world_size, "probe")
    batch = batch_for(step, vocab)
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    rows = slice(env.rank * layout.per_rank, (env.rank + 1) * layout.per_rank)
    micro = split_micro_batches({k: v[rows] for k, v in batch.items()}, MICRO)
    engine.set_lr(1e-3)
    for i, mb in enumerate(micro):
        engine.backward(mb, last=i == len(micro) - 1, global_targets=targets)
    engine.optimizer_step()


def gathered_state(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in engine.model.named_parameters():
        state[f"{name}/fp32"] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).clone()
    zero = engine.deepspeed_engine.optimizer
    steps = [zero.optimizer.state[flat]["step"] for flat in zero.fp32_partitioned_groups_flat]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zero.optimizer.param_groups]
    return {"tensors": state, "steps": [float(s) for s in steps], "groups": groups}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("save", "load"))
    parser.add_argument("--dir", required=True, help="the run directory")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--then-save", help="train one more step, commit it, write the state here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = compose_pretrain_config(["+experiment=debug", f"train.micro_batch_size={MICRO}"])
    env = eng.init_distributed(5.0)
    layout = batch_layout(SEQUENCES * SEQ_LEN, SEQ_LEN, MICRO, env.world_size, "probe")
    torch.manual_seed(cfg.train.seed)
    engine = eng.TrainingEngine(cfg, env, layout)

    def all_ok(ok: bool) -> bool:
        return collectives.all_reduce_sum([0.0 if ok else 1.0], torch.device("cpu"))[0] == 0.0

    manager = CheckpointManager(
        Path(args.dir),
        3,
        env.rank,
        collectives.barrier,
        all_ok,
        all_gather=collectives.all_gather_object,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    vocab = cfg.model.vocab_size
    if args.phase == "save":
        for step in range(1, args.steps + 1):
            train_step(engine, env, step, vocab)
        manager.save(engine, args.steps, {"step": args.steps, "tokens": args.steps * 512})
        step = args.steps
    else:
        step = manager.load_latest(engine)["step"]
    state = gathered_state(engine)
    if env.is_main:
        torch.save(state, args.out)
    if args.then_save:
        train_step(engine, env, step + 1, vocab)
        manager.save(engine, step + 1, {"step": step + 1, "tokens": (step + 1) * 512})
        state = gathered_state(engine)
        if env.is_main:
            torch.save(state, args.then_save)
    eng.shutdown()


if __name__ == "__main__":
    main()
