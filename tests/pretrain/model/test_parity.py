"""Loss parity of our trainer with a plain PyTorch loop over Hugging Face's `LlamaForCausalLM`.

What is compared, and to which tolerance:

* **Trainer runs** (`python -m pretrain +experiment=debug`, DeepSpeed ZeRO-3 over gloo, `deepspeed.precision=fp32`,
  a fixed global batch of 512 tokens = 8 sequences of 64, 20 steps covering the LR warmup (8 steps) and the
  cosine decay to 10% at the last step): 1 rank with micro-batch 8 (no accumulation), 2 ranks with micro-batch 4
  (no accumulation) and 2 ranks with micro-batch 2 (2 accumulation steps).
* **Reference** (one loop, shared by every case): `transformers.LlamaForCausalLM` with eager attention (matmul
  and softmax: no attention kernel in common with our model), loaded with our model's initial weights (a plain
  `Transformer` built after `torch.manual_seed(train.seed)`, renamed by `pretrain.evaluation.export`); the same global
  batches (`MixtureDataset` + `GlobalBatchLoader(rank=0, world_size=1)`, read as the trainer reads them); an
  additive float 4D mask, causal AND same document, built from `document_ids` (transformers 5 passes a 4D mask
  through untouched, and eager attention *adds* it, so a boolean mask would be silently wrong there), with the
  batch's `position_ids`; the loss = summed cross-entropy of the unmasked targets of the global batch / their
  count; `torch.optim.AdamW` (foreach) with matrices decayed and norms and embeddings not; the LR from the
  warmup + cosine formula written out here, at the tokens after the step; `clip_grad_norm_` at `optim.grad_clip`.

Asserted per case and per step: `train/loss` within 1e-4 relative of the reference (the requirement; observed
about 1e-7), `train/grad_norm` (before clipping) within 1e-4 relative, the same number of target tokens, the
LR equal to the formula, the accumulation steps as configured; and after the 20 steps the weights of the
trainer's final checkpoint (consolidated from the ZeRO-3 shards) within 1e-5 of the reference's (relative, in
norm over all parameters), and its weight-decay parameter list equal to the reference's.
The premise is checked directly: the full parameters gathered from the real `Trainer`'s ZeRO-3 shards on 2
ranks, before any step, are bitwise those of a plain `Transformer` built with the same seed.

The debug corpus has long documents (few boundaries per batch: dropping the document mask changes these losses
by only about 1e-4), so document masking is also compared on its own, without processes, on a synthetic packed
batch with many boundaries and padding: loss and every gradient of our model against transformers, with eager +
float mask and SDPA + boolean mask: the loss to 1e-5 relative (observed about 1e-7), each gradient to 1e-4 in norm
(observed at most 2e-6); the same batch with a causal mask only is off by more than 1e-3 (observed 4e-3), so
the comparison sees a masking error.

The trainer tests are marked `slow` (one module fixture runs the 3 trainer runs and the probe side by side while
this process computes the reference: about 1.5 min on 2 cores); the synthetic masking test takes a second and is
not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX, GlobalBatchLoader, collate
from data.mixture import MixtureDataset
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import SUMMARY_FILE, newest_weights
from pretrain.config import ModelConfig, PretrainConfig, compose_pretrain_config
from pretrain.evaluation.export import hf_name, hf_state_dict, llama_config, mixtral_config
from pretrain.model.transformer import Transformer
from tests.helpers import ROOT, read_metrics, run_pretrain

transformers = pytest.importorskip("transformers")

STEPS = 20
BATCH_TOKENS = 512
SEQ_LEN = 64  # the debug experiment's data.packing.seq_len
LOSS_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-4
WEIGHTS_RTOL = 1e-5
OVERRIDES = (
    "deepspeed.precision=fp32",
    f"train.global_batch_tokens={BATCH_TOKENS}",
    "train.start_batch_tokens=0",
    "train.batch_ramp_tokens=0",
    f"train.total_tokens={STEPS * BATCH_TOKENS}",
    "train.eval_every_steps=0",
    "train.checkpoint_every_steps=0",
    "train.sample_tokens=0",
    "logging.wandb_mode=disabled",
)
# name: (ranks, micro-batch, gradient accumulation steps) for 8 sequences per global batch
CASES = {"1rank": (1, 8, 1), "2ranks": (2, 4, 1), "2ranks-accum2": (2, 2, 2)}
PROBE = ROOT / "tests" / "pretrain" / "model" / "init_probe.py"


def relative(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def weights_difference(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], name_in_want=lambda name: name
) -> float:
    """||got - want|| / ||want|| over all parameters (fp64), `got`'s names mapped to `want`'s."""
    with torch.no_grad():
        diff = sum(float((t - want[name_in_want(n)]).double().pow(2).sum()) for n, t in got.items())
        norm = sum(float(want[name_in_want(n)].double().pow(2).sum()) for n in got)
    return math.sqrt(diff / norm)


def lr_formula(cfg: PretrainConfig, tokens: int) -> float:
    """Linear warmup to the peak over warmup_tokens, then cosine to min_lr_ratio * peak at total_tokens."""
    peak, warmup, total = cfg.optim.lr, cfg.optim.warmup_tokens, cfg.train.total_tokens
    if tokens < warmup:
        return peak * tokens / warmup
    floor = peak * cfg.optim.min_lr_ratio
    progress = min(1.0, (tokens - warmup) / (total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def hf_llama(cfg: ModelConfig, state: dict[str, torch.Tensor], attention: str, pad_id: int = 0):
    """A LlamaForCausalLM in fp32 with `attention` ("eager" or "sdpa") holding our weights `state`."""
    config = dict(llama_config(cfg, bos_id=1, eos_id=2, pad_id=pad_id, dtype="float32"))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation=attention))
    model.load_state_dict(hf_state_dict(state, cfg), strict=True)
    assert model.config._attn_implementation == attention
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    return model


def document_causal_mask(document_ids: torch.Tensor, attention: str) -> torch.Tensor:
    """[B, 1, T, T]: query t sees key s <= t of its own document (padding, id -1, sees earlier padding);
    boolean (True = attend) for SDPA, additive float (0 or the dtype minimum) for eager attention."""
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def hf_mixtral(cfg: ModelConfig, state: dict[str, torch.Tensor], attention: str, pad_id: int = 0):
    """A MixtralForCausalLM in fp32 with `attention` holding our MoE model's weights `state`."""
    config = dict(mixtral_config(cfg, bos_id=1, eos_id=2, pad_id=pad_id, dtype="float32"))
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**config, attn_implementation=attention)
    )
    model.load_state_dict(hf_state_dict(state, cfg), strict=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    return model


def hf_forward(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The logits. For Mixtral, each layer's router logits land in `model.router_logits` (read off the routers:
    `output_router_logits` would also compute transformers' own auxiliary loss, which refuses a 4D mask)."""
    model.router_logits = []
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=mask,
        use_cache=False,
    ).logits


def record_router_logits(model) -> None:
    """Forward hooks that append each Mixtral router's logits (its first output) to `model.router_logits`."""
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda _, __, out: model.router_logits.append(out[0]))


def hf_loss_sum(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    return summed_cross_entropy(hf_forward(model, batch, mask), batch)


def summed_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch["labels"].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def router_loss_formula(
    cfg: ModelConfig, router_logits: tuple[torch.Tensor, ...], rows: int, micro_batch: int
) -> tuple[torch.Tensor, float]:
    """The router losses from the papers' formulas on transformers' router logits ([rows * T, E] per layer):
    per micro-batch of `micro_batch` consecutive rows and per layer, Switch's balance E * sum_e f_e * P_e (f_e
    the share of the top-k assignments to e, P_e the mean softmax probability) times its coefficient plus
    ST-MoE's z-loss mean(logsumexp^2) times its; averaged over layers, then over the micro-batches. Also the
    unweighted balance loss averaged the same way (what the trainer logs)."""
    moe = cfg.moe
    per_micro_batch, balances = [], []
    for start in range(0, rows, micro_batch):
        per_layer = []
        for layer_logits in router_logits:
            logits = layer_logits.float().view(rows, -1, moe.num_experts)[start : start + micro_batch]
            logits = logits.reshape(-1, moe.num_experts)
            chosen = logits.topk(moe.top_k, dim=-1).indices.flatten()
            share = torch.bincount(chosen, minlength=moe.num_experts).float() / chosen.numel()
            balance = moe.num_experts * (share * logits.softmax(dim=-1).mean(dim=0)).sum()
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
            per_layer.append(moe.load_balance_coef * balance + moe.z_loss_coef * z_loss)
            balances.append(balance.item())
        per_micro_batch.append(torch.stack(per_layer).mean())
    return torch.stack(per_micro_batch).mean(), sum(balances) / len(balances)


def decays(name: str, param: torch.Tensor) -> bool:
    """Hugging Face names: matrices decay; norms (1-D) and the token embedding do not."""
    return param.ndim >= 2 and name != "model.embed_tokens.weight"


@dataclass
class Reference:
    initial: dict[str, torch.Tensor]  # our names
    final: dict[str, torch.Tensor] = field(default_factory=dict)  # Hugging Face names
    decay_names: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    balances: list[float] = field(default_factory=list)  # MoE: the load-balancing loss the trainer logs


def reference_run(cfg: PretrainConfig, micro_batch: int | None = None) -> Reference:
    """The plain PyTorch loop over transformers' Llama (Mixtral for an MoE model, whose router losses are
    computed per global micro-batch of `micro_batch` rows), on the batches the trainer reads."""
    _, info = load_tokenizer(cfg.tokenizer.dir)
    seq_len = cfg.data.packing.seq_len
    planned = -(-cfg.train.total_tokens // seq_len)  # as Trainer.__init__
    data = MixtureDataset.from_tokenizer(cfg.data, info, split="train", planned_samples=planned)
    loader = GlobalBatchLoader(data, rank=0, world_size=1)
    batch_schedule = cfg.batch_schedule()

    torch.manual_seed(cfg.train.seed)
    ours = Transformer(cfg.model)
    ref = Reference(initial={k: v.detach().clone() for k, v in ours.state_dict().items()})
    build = hf_mixtral if cfg.model.moe.enabled else hf_llama
    model = build(cfg.model, ours.state_dict(), "eager", pad_id=info.pad_id).train()
    del ours
    if cfg.model.moe.enabled:
        record_router_logits(model)

    named = list(model.named_parameters())
    ref.decay_names = [name for name, p in named if decays(name, p)]
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": opt.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        foreach=True,
    )
    tokens = 0
    for _ in range(STEPS):
        batch_tokens = batch_schedule(tokens)
        batch = loader.next_batch(batch_tokens // seq_len)
        targets = int((batch["labels"] != IGNORE_INDEX).sum())
        mask = document_causal_mask(batch["document_ids"], "eager")
        loss = summed_cross_entropy(hf_forward(model, batch, mask), batch) / targets
        objective = loss
        if cfg.model.moe.enabled:
            rows = len(batch["input_ids"])
            router_loss, balance = router_loss_formula(
                cfg.model, tuple(model.router_logits), rows, micro_batch or rows
            )
            objective = loss + router_loss
            ref.balances.append(balance)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        lr = lr_formula(cfg, tokens + batch_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        tokens += batch_tokens
        ref.losses.append(loss.item())
        ref.targets.append(targets)
        ref.grad_norms.append(grad_norm.item())
        ref.lrs.append(lr)
    ref.final = {name: p.detach().clone() for name, p in named}
    return ref


def init_probe(artifacts: Path, runs: Path, out: Path) -> None:
    """The real Trainer on 2 ZeRO-3 ranks under torchrun, writing its gathered initial weights to `out`."""
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(PROBE),
        "--out", str(out), "--", "+experiment=debug", f"paths.artifacts={artifacts}", f"paths.runs={runs}",
        "train.run_name=init-probe", *OVERRIDES,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@dataclass
class Parity:
    cfg: PretrainConfig
    reference: Reference
    runs: Path
    init_probe: dict


@pytest.fixture(scope="module")
def parity(debug_artifacts, tmp_path_factory) -> Parity:
    """Every trainer run and the initial-weights probe as subprocesses side by side (one thread each), while
    this process computes the reference; each process uses one thread so 2 cores are not oversubscribed."""
    runs = tmp_path_factory.mktemp("parity-runs")
    probe_out = runs / "init.pt"
    cfg = compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}", *OVERRIDES])
    one_thread = {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=len(CASES) + 1) as pool:
        jobs = [
            pool.submit(
                run_pretrain,
                debug_artifacts,
                runs,
                *OVERRIDES,
                f"train.run_name={name}",
                f"train.local_processes={ranks}",
                f"train.micro_batch_size={micro}",
                env=one_thread,
            )
            for name, (ranks, micro, _) in CASES.items()
        ]
        jobs.append(pool.submit(init_probe, debug_artifacts, runs, probe_out))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reference = reference_run(cfg)
        finally:
            torch.set_num_threads(threads)
        for job in jobs:
            job.result()
    return Parity(cfg, reference, runs, torch.load(probe_out, weights_only=True))


@pytest.mark.slow
def test_zero3_initial_weights_are_a_plain_model_built_with_the_seed(parity):
    """The premise: Trainer seeds torch, then builds the model under zero.Init; gathered back from 2 ranks'
    shards, its parameters are bitwise those of `Transformer(cfg.model)` after `torch.manual_seed(seed)`."""
    assert parity.init_probe["world_size"] == 2
    gathered, plain = parity.init_probe["state"], parity.reference.initial
    assert sorted(gathered) == sorted(plain)
    unequal = [name for name in plain if not torch.equal(gathered[name], plain[name])]
    assert not unequal, f"initial weights differ from the seeded plain model in {unequal}"
    torch.manual_seed(parity.cfg.train.seed + 1)
    other = Transformer(parity.cfg.model).state_dict()
    assert not torch.equal(other["embed_tokens.weight"], plain["embed_tokens.weight"])  # the seed matters


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_losses_equal_a_plain_transformers_loop(parity, case):
    ranks, micro, accumulation = CASES[case]
    ref, run_dir = parity.reference, parity.runs / case
    logged = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))

    assert all(m["train/grad_accum"] == accumulation for m in logged)
    assert all(m["train/batch_tokens"] == BATCH_TOKENS for m in logged)
    assert [int(m["train/target_tokens"]) for m in logged] == ref.targets, "different batches"
    for m, lr in zip(logged, ref.lrs, strict=True):
        assert m["train/lr"] == pytest.approx(lr, rel=1e-12), m["step"]
    assert ref.lrs[7] == pytest.approx(parity.cfg.optim.lr)  # warmup ends at step 8 ...
    assert ref.lrs[-1] == pytest.approx(
        parity.cfg.optim.lr * parity.cfg.optim.min_lr_ratio
    )  # ... decay at 20

    loss_diffs = [relative(m["train/loss"], want) for m, want in zip(logged, ref.losses, strict=True)]
    norm_diffs = [
        relative(m["train/grad_norm"], want) for m, want in zip(logged, ref.grad_norms, strict=True)
    ]
    assert max(ref.grad_norms) > parity.cfg.optim.grad_clip  # clipping was exercised

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert sorted(hf_name(n) for n in summary["weight_decay_parameters"]) == sorted(ref.decay_names)
    checkpoint, trained = newest_weights(run_dir)
    assert checkpoint.step == STEPS
    assert sorted(hf_name(n) for n in trained) == sorted(ref.final)
    weights_diff = weights_difference(trained, ref.final, hf_name)

    print(
        f"\nparity {case} ({ranks} rank(s), micro-batch {micro}, accumulation {accumulation}): max relative"
        f" difference: loss {max(loss_diffs):.2e} (step {1 + int(np.argmax(loss_diffs))}), grad norm"
        f" {max(norm_diffs):.2e}, final weights {weights_diff:.2e}"
    )
    for step, (m, want, d) in enumerate(zip(logged, ref.losses, loss_diffs, strict=True), start=1):
        assert d <= LOSS_RTOL, (
            f"step {step}: trainer loss {m['train/loss']!r}, reference {want!r}, rel {d:.2e}"
        )
    for step, (m, want, d) in enumerate(zip(logged, ref.grad_norms, norm_diffs, strict=True), start=1):
        assert d <= GRAD_NORM_RTOL, f"step {step}: grad norm {m['train/grad_norm']!r}, reference {want!r}"
    assert weights_diff <= WEIGHTS_RTOL, weights_diff


def synthetic_packed_batch(vocab: int, pad_id: int) -> dict[str, torch.Tensor]:
    """4 packed rows of 65 tokens with many documents each and padding tails, through the real `collate`."""
    rng = np.random.default_rng(3)
    samples = []
    for lengths, padding in [([9, 20, 3, 33], 0), ([1, 2, 40, 7], 15), ([65], 0), ([5] * 11, 10)]:
        document_ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(padding, -1)])
        position_ids = np.concatenate([np.arange(n) for n in lengths] + [np.arange(padding)])
        tokens = rng.integers(3, vocab, size=65)
        tokens[document_ids < 0] = pad_id
        samples.append({"tokens": tokens, "position_ids": position_ids, "document_ids": document_ids})
    return collate(samples)


def test_document_masked_loss_and_gradients_equal_transformers():
    # Weights larger than a fresh init's, so that attention (and so the mask) visibly moves the loss.
    cfg = ModelConfig(
        name="t", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64,
        init_std=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with torch.no_grad():  # norm weights of ones would hide a norm mapped to the wrong place
        for name, param in ours.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    batch = synthetic_packed_batch(cfg.vocab_size, pad_id=0)
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    assert 150 < targets < 4 * 64 - 25  # many targets masked at boundaries and in padding

    loss = ours(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        labels=batch["labels"],
        reduction="sum",
    )
    loss.backward()
    ours_grads = {hf_name(n): p.grad for n, p in ours.named_parameters()}

    for attention in ("eager", "sdpa"):
        model = hf_llama(cfg, ours.state_dict(), attention)
        theirs = hf_loss_sum(model, batch, document_causal_mask(batch["document_ids"], attention))
        theirs.backward()
        assert relative(loss.item(), theirs.item()) < 1e-5, attention
        for name, param in model.named_parameters():
            want = param.grad
            got = ours_grads[name]
            assert float((got - want).norm() / want.norm()) < 1e-4, (attention, name)

    with torch.no_grad():  # without the document mask the loss is far off: the comparison sees masking errors
        causal_only = torch.ones(64, 64, dtype=torch.bool).tril().expand(4, 1, 64, 64)
        unmasked = hf_loss_sum(hf_llama(cfg, ours.state_dict(), "sdpa"), batch, causal_only)
    assert relative(unmasked.item(), loss.item()) > 1e-3
