"""Sequence parallelism (DeepSpeed-Ulysses) on 2 real gloo ranks: SP=2 trains exactly as SP=1 does.

The corpus is short documents (a few to about 60 tokens), so the 64-token rows of the debug model hold several
documents each: boundaries fall inside each rank's 32-token slice and documents run across the two slices.
Each pair of runs starts from the same weights and reads the same samples in the same order; in fp32 their
losses and gradient norms agree to rounding.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from data.loader import GlobalBatchLoader, collate
from data.mixture import MixtureDataset
from data.tokenizer import load_tokenizer
from pretrain.config import ConfigError, compose_pretrain_config
from pretrain.model.transformer import documents_from_positions
from pretrain.planning.memory_model import tiled_mlp_shards
from pretrain.train.sequence_parallel import data_parallel, slice_sequences
from tests.data.prepare_corpus import random_text, write_corpus
from tests.helpers import read_metrics, run_pretrain

STEPS = 20
SP2 = ("deepspeed.sequence_parallel_size=2",)
TOKENS = STEPS * 512  # the debug batch schedule stays at 512 tokens (8 sequences) for 20 steps


# -- the pieces, on one process ----------------------------------------------------------------------------
def packed_sample(lengths: list[int], capacity: int = 9) -> dict:
    """A packed sample as `data.packing.materialize` writes it: segments, then one padding run."""
    import numpy as np

    positions, documents = [], []
    for j, n in enumerate(lengths):
        positions += list(range(n))
        documents += [j] * n
    rest = capacity - len(positions)
    positions += list(range(rest))
    documents += [-1] * rest
    tokens = np.arange(capacity, dtype=np.int64) + 10
    return {"tokens": tokens, "position_ids": np.array(positions), "document_ids": np.array(documents)}


def test_documents_are_rebuilt_from_positions_with_the_same_boundaries():
    batch = collate([packed_sample([3, 2, 1]), packed_sample([5, 2])])  # row 2 ends in padding
    rebuilt = documents_from_positions(batch["position_ids"])
    same = batch["document_ids"][:, :, None] == batch["document_ids"][:, None, :]
    assert torch.equal(rebuilt[:, :, None] == rebuilt[:, None, :], same)


def test_each_rank_keeps_its_contiguous_slice_of_every_row():
    batch = collate([packed_sample([3, 5]), packed_sample([8])])  # 8 input tokens per row
    first, second = slice_sequences(batch, 0, 2), slice_sequences(batch, 1, 2)
    for key in ("input_ids", "labels", "position_ids", "document_ids"):
        assert torch.equal(torch.cat([first[key], second[key]], dim=1), batch[key])
    assert second["position_ids"][0].tolist() == [
        1,
        2,
        3,
        4,
    ]  # global positions: the document began on rank 0


def test_a_batch_whose_documents_do_not_start_at_position_zero_is_refused():
    batch = collate([packed_sample([4, 5])])
    batch["position_ids"][0, 4] = 7  # the second document no longer starts at 0
    with pytest.raises(ValueError, match="position 0"):
        slice_sequences(batch, 0, 2)


def test_groups_are_consecutive_ranks_and_batches_count_data_parallel_ranks():
    assert [data_parallel(r, 8, 4) for r in (0, 3, 4, 7)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert tiled_mlp_shards(1, 32, 64) == 1 and tiled_mlp_shards(1, 4096, 512) == 8
    assert tiled_mlp_shards(1, 96, 64, wanted=5) == 6  # raised to a divisor of the length
    assert tiled_mlp_shards(2, 4096, 4096) == 2  # TiledMLP's backward slices the micro-batch's rows x tokens


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("deepspeed.sequence_parallel_size=3", "does not divide model.n_heads=4"),
        ("deepspeed.sequence_parallel_size=0", "must be 1 \\(off\\) or more"),
    ],
)
def test_an_impossible_sequence_parallel_size_names_the_key(override, message):
    with pytest.raises(ConfigError, match=f"deepspeed.sequence_parallel_size.*{message}"):
        compose_pretrain_config(["+experiment=debug", override]).validate()


def test_expert_and_sequence_parallelism_together_are_refused():
    overrides = ["+experiment=debug", "model.moe.num_experts=4", "deepspeed.expert_parallel_size=2"]
    with pytest.raises(ConfigError, match=r"deepspeed\.sequence_parallel_size.*AutoEP"):
        compose_pretrain_config([*overrides, "deepspeed.sequence_parallel_size=2"]).validate()


# -- the trainer on 2 ranks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> tuple[Path, list[str]]:
    """A corpus of 3,000 short documents and the data overrides that train on it."""
    root = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    corpus = root / "corpus" / "short.jsonl"
    write_corpus(corpus, [random_text(rng, 40) for _ in range(3000)])
    return root, ["data=local_jsonl", f"data.sources.web.paths=[{corpus}]", f"train.total_tokens={TOKENS}"]


def train(root: Path, name: str, data: list[str], *overrides: str) -> list[dict]:
    run_pretrain(root / "artifacts", root / "runs", *data, f"train.run_name={name}", *overrides)
    return read_metrics(root / "runs" / name)


@pytest.fixture(scope="module")
def full_runs(short_documents) -> dict[str, list[dict]]:
    """SP=1 and SP=2 with full attention (SP=2 also with TiledMLP in 4 slices under activation checkpointing),
    and both with a sliding window of 16 and one KV head (which Ulysses replicates to both ranks)."""
    root, data = short_documents
    sp2 = list(SP2)
    window = ["model.sliding_window=16", "model.n_kv_heads=1"]
    return {
        "sp1": train(root, "sp1", data),
        "sp2": train(root, "sp2", data, *sp2, "deepspeed.tiled_mlp=true", "deepspeed.tiled_mlp_shards=4"),
        "sp1_window": train(root, "sp1_window", data, *window),
        "sp2_window": train(root, "sp2_window", data, *sp2, *window),
    }


def assert_same_steps(a: list[dict], b: list[dict], steps: range) -> None:
    by_step_a, by_step_b = ({m["step"]: m for m in run if "train/loss" in m} for run in (a, b))
    for step in steps:
        x, y = by_step_a[step], by_step_b[step]
        assert x["train/target_tokens"] == y["train/target_tokens"], step
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5, (step, x["train/loss"], y["train/loss"])
        assert abs(x["train/grad_norm"] - y["train/grad_norm"]) <= 1e-5, (step, x, y)


@pytest.mark.slow
def test_the_batches_hold_boundaries_inside_and_across_the_slices(short_documents, full_runs):
    root, data = short_documents
    cfg = compose_pretrain_config(["+experiment=debug", f"paths.artifacts={root / 'artifacts'}", *data])
    _, info = load_tokenizer(cfg.tokenizer.dir)
    dataset = MixtureDataset.from_tokenizer(cfg.data, info, split="train", planned_samples=TOKENS // 64)
    documents = GlobalBatchLoader(dataset, rank=0, world_size=1).next_batch(8)["document_ids"]
    halves = documents[:, :32], documents[:, 32:]
    assert all(bool((h[:, 1:] != h[:, :-1]).any()) for h in halves)  # boundaries inside both ranks' slices
    assert bool((documents[:, 31] == documents[:, 32]).any())  # a document across the two slices


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["", "_window"])
def test_sequence_parallel_training_matches_one_rank_per_sequence(full_runs, attention):
    sp1, sp2 = full_runs[f"sp1{attention}"], full_runs[f"sp2{attention}"]
    assert [m["step"] for m in sp2 if "train/loss" in m] == list(range(1, STEPS + 1))
    assert_same_steps(sp1, sp2, range(1, STEPS + 1))
    # Validation reads the same held-out sequences (micro x SP per data-parallel rank) and gives the same loss.
    val1, val2 = ([(m["step"], m["val/loss"]) for m in run if "val/loss" in m] for run in (sp1, sp2))
    assert [s for s, _ in val1] == [s for s, _ in val2] == [10, 20]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(val1, val2, strict=True)), (val1, val2)


@pytest.mark.slow
def test_the_window_changes_the_run_the_parity_compares(full_runs):
    losses = (
        [m["train/loss"] for m in full_runs[name] if "train/loss" in m] for name in ("sp1", "sp1_window")
    )
    gaps = [abs(a - b) for a, b in zip(*losses, strict=True)]
    assert max(gaps) > 1e-3, gaps


@pytest.mark.slow
def test_a_run_resumes_across_a_change_of_sequence_parallel_size(short_documents, full_runs):
    """The SP=1 run as a job would find it after losing everything past its step-10 checkpoint, resumed at SP=2:
    the same steps 11-20 as the uninterrupted SP=1 run (ZeRO-3 shards over all ranks either way; the data
    position counts samples, not ranks)."""
    root, data = short_documents
    shutil.copytree(root / "runs" / "sp1", root / "runs" / "resized")
    shutil.rmtree(root / "runs" / "resized" / "checkpoints" / "step_00000020")
    result = run_pretrain(root / "artifacts", root / "runs", *data, "train.run_name=resized", *SP2)
    assert "resumed from" in result.stderr and "trained 10 steps in this process" in result.stderr
    assert "sequence parallelism: 1 groups of 2 ranks" in result.stderr
    resumed = read_metrics(root / "runs" / "resized")
    assert [m["step"] for m in resumed if "train/loss" in m] == list(range(1, STEPS + 1))
    assert_same_steps(full_runs["sp1"], resumed, range(11, STEPS + 1))
