"""One rank of a gradient probe (run by torchrun from tests/pretrain/train/test_gradients.py).

Builds the real `TrainingEngine` (DeepSpeed ZeRO-3 over gloo) for the debug model, feeds one fixed global batch
with padding and masked targets as `--micro` sized micro-batches, and before the optimizer step writes the full
accumulated gradient (gathered from every rank's partition) to `--out`. With `--reference` rank 0 also writes,
for the same weights, the per-micro-batch gradients of a plain copy of the model in the engine's precision
summed in fp32: the gradient an exact fp32 accumulation gives.

An MoE model (`--set model.moe.num_experts=4`) adds its router losses to the reference as the trainer does: each
micro-batch's weighs 1 / (micro-batches in the global batch). `--disjoint-steps N` instead forces the routing
apart by rank (rank r's tokens go only to experts 2r and 2r + 1, through the router's own weights) and takes N
optimizer steps, writing each step's loss, grad norm and each rank's expert counts.

With `--reduction` it instead reduces, through the trainer's bf16 DeepSpeed config, per-rank gradients that are
each exact in bf16 but whose sum is not, and writes the reduced gradient. `--set KEY=VALUE` adds Hydra
overrides; `--break-scaling` puts back DeepSpeed 0.18.3's gradient hook (it divided by the accumulation steps
even under `backward(scale_wrt_gas=False)`; fixed in 0.18.4), which the start-up check must refuse.

    torchrun --nproc_per_node=W tests/pretrain/train/grad_probe.py --micro M --precision bf16 --out grads.pt
"""

from __future__ import annotations

import argparse

import torch

from data.loader import IGNORE_INDEX, split_micro_batches
from pretrain.batching import batch_layout
from pretrain.config import compose_pretrain_config
from pretrain.model.moe import STAT_COUNTS
from pretrain.model.transformer import Transformer
from pretrain.train import engine as eng

SEQUENCES, SEQ_LEN = 8, 64


def global_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Eight packed rows whose target counts differ widely: padding tails, document boundaries, masked spans."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(4, vocab, (SEQUENCES, SEQ_LEN + 1), generator=gen)
    document_ids = torch.zeros(SEQUENCES, SEQ_LEN + 1, dtype=torch.int64)
    for row, (boundary, padded_from) in enumerate(
        [(20, 65), (10, 30), (40, 65), (5, 12), (33, 50), (60, 65), (2, 8), (16, 64)]
    ):
        document_ids[row, boundary:] = 1
        document_ids[row, padded_from:] = -1
    labels = tokens[:, 1:].clone()
    crosses = document_ids[:, 1:] != document_ids[:, :-1]
    labels[crosses | (document_ids[:, 1:] < 0)] = IGNORE_INDEX
    inputs = document_ids[:, :-1]
    positions = torch.zeros_like(inputs)
    for row in range(SEQUENCES):
        for t in range(1, SEQ_LEN):
            positions[row, t] = 0 if inputs[row, t] != inputs[row, t - 1] else positions[row, t - 1] + 1
    return {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": positions, "document_ids": inputs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--gradient-dtype", default="fp32")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--reduction", action="store_true")
    parser.add_argument("--break-scaling", action="store_true")
    parser.add_argument("--disjoint-steps", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.break_scaling:
        break_gradient_scaling()

    cfg = compose_pretrain_config(
        [
            "+experiment=debug",
            f"deepspeed.precision={args.precision}",
            f"deepspeed.gradient_dtype={args.gradient_dtype}",
            f"train.micro_batch_size={args.micro}",
            "deepspeed.activation_checkpointing=false",
            *args.set,
        ]
    )
    env = eng.init_distributed(5.0)
    if args.reduction:
        reduce_across_ranks(cfg, env, args.out)
        return
    layout = batch_layout(SEQUENCES * SEQ_LEN, SEQ_LEN, args.micro, env.world_size, "probe")
    torch.manual_seed(cfg.train.seed)
    if args.disjoint_steps:
        route_by_rank(env.rank)
    engine = eng.TrainingEngine(cfg, env, layout)
    batch = global_batch(cfg.model.vocab_size)
    if args.disjoint_steps:
        train_disjoint(engine, env, layout, batch, args)
        return
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    rows = slice(env.rank * layout.per_rank, (env.rank + 1) * layout.per_rank)
    micro_batches = split_micro_batches({k: v[rows] for k, v in batch.items()}, args.micro)
    for i, mb in enumerate(micro_batches):
        engine.backward(mb, last=i == len(micro_batches) - 1, global_targets=targets)

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    params = dict(engine.model.named_parameters())
    grads = {name: safe_get_full_grad(p).float().clone() for name, p in params.items()}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        weights = {name: p.detach().clone() for name, p in params.items()}
    if env.is_main:
        result = {"grads": grads, "targets": targets}
        if args.reference:
            result["reference"] = reference_gradients(cfg, weights, batch, args.micro, targets)
        torch.save(result, args.out)
    eng.shutdown()


def route_by_rank(rank: int) -> None:
    """Rank r's tokens pick experts 2r and 2r + 1, weighted by the softmax of the router's logits for those two
    (so the router still gets a gradient): the two ranks never share an expert."""
    from pretrain.model import moe

    def forced(self, tokens):
        logits = torch.nn.functional.linear(tokens.float(), self.router.weight.float())
        chosen = torch.tensor([2 * rank, 2 * rank + 1]).expand(tokens.shape[0], 2)
        return logits, chosen, logits.gather(1, chosen).softmax(dim=-1)

    moe.MoEFeedForward.route = forced


def train_disjoint(engine, env, layout, batch, args) -> None:
    """`--disjoint-steps` optimizer steps on the probe batch; rank 0 writes the losses, grad norms and counts."""
    from pretrain.train.collectives import all_gather_object

    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    rows = slice(env.rank * layout.per_rank, (env.rank + 1) * layout.per_rank)
    micro_batches = split_micro_batches({k: v[rows] for k, v in batch.items()}, args.micro)
    steps = []
    for _ in range(args.disjoint_steps):
        losses = [
            float(engine.backward(mb, last=i == len(micro_batches) - 1, global_targets=targets))
            for i, mb in enumerate(micro_batches)
        ]
        update = engine.optimizer_step()
        counts = engine.router_stats.total[:, STAT_COUNTS:].sum(dim=0).tolist()
        engine.router_stats.take(engine.device)
        steps.append(
            {"loss": sum(losses), "grad_norm": update.grad_norm, "counts": all_gather_object(counts)}
        )
    if env.is_main:
        torch.save({"steps": steps}, args.out)
    eng.shutdown()


def break_gradient_scaling() -> None:
    """DeepSpeed's per-tensor output hook as 0.18.3 had it, before its PR #7724: always divide by the
    accumulation steps, whatever `scale_wrt_gas` says."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    def divide_always(self, grad):
        return None if grad is None else grad / self.gradient_accumulation_steps()

    DeepSpeedEngine._backward_prologue_per_tensor = divide_always


# Rank 0 contributes 1 and rank 1 2**-9 to every element (each exact in bf16); their sum 1 + 2**-9 is not: bf16
# keeps 8 significant bits, so a bf16 reduction rounds the sum back to 1.
RANK_INPUTS = (1.0, 2.0**-9)


def reduce_across_ranks(cfg, env, out: str) -> None:
    """One micro-batch per rank of loss = w . x through the engine built from the trainer's bf16 DeepSpeed
    config, the loss scaled by the world size as the trainer does; writes the reduced (fp32) gradient of w."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    assert env.world_size == len(RANK_INPUTS), "run the reduction probe on 2 ranks"
    layout = batch_layout(env.world_size * SEQ_LEN, SEQ_LEN, 1, env.world_size, "reduction")
    module = torch.nn.Linear(16, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
        config=eng.deepspeed_config(cfg, layout, "bf16"),
        dist_init_required=False,
    )
    assert module.weight.dtype == torch.bfloat16
    x = torch.full((1, 16), RANK_INPUTS[env.rank], dtype=torch.bfloat16)
    engine.set_gradient_accumulation_boundary(True)
    loss = engine(x).sum()
    engine.backward(loss * env.world_size, scale_wrt_gas=False)
    grad = safe_get_full_grad(module.weight).float().clone()
    if env.is_main:
        torch.save({"grad": grad}, out)
    eng.shutdown()


def reference_gradients(cfg, weights, batch, micro: int, targets: int) -> dict[str, torch.Tensor]:
    """The same weights in a plain module: each micro-batch's gradient in the training dtype, summed in fp32."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.load_state_dict(weights, assign=True)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
    micro_batches = split_micro_batches(batch, micro)
    for mb in micro_batches:
        model.zero_grad(set_to_none=True)
        loss = model(
            mb["input_ids"],
            position_ids=mb["position_ids"],
            document_ids=mb["document_ids"],
            labels=mb["labels"],
            reduction="sum",
        )
        if model.router_loss is not None:  # MoE: the mean of the micro-batches' router losses
            loss = loss + model.router_loss * targets / len(micro_batches)
        (loss / targets).backward()
        for name, p in model.named_parameters():
            total[name] += p.grad.float()
    return total


if __name__ == "__main__":
    main()
