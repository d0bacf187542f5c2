"""The global-batch loader: exact resume, rank slices that add up to the same global batch for any world size,
batch-size changes without skipping or repeating a sample, and the batch format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import DataConfig, PackingConfig, SourceConfig
from data.loader import IGNORE_INDEX, GlobalBatchLoader, collate, split_micro_batches
from data.mixture import MixtureDataset
from data.packing import ArrayDocumentStore

PAD = 0
SEQ_LEN = 32


def make_dataset(seed: int = 1234, planned: int = 1_000) -> MixtureDataset:
    """A two-source mixture over in-memory documents (the shard path is covered by test_mixture)."""
    rng = np.random.default_rng(0)
    stores = {
        name: ArrayDocumentStore.from_documents(
            [rng.integers(1, 1000, size=int(k)) for k in rng.integers(3, 90, n)]
        )
        for name, n in (("a", 200), ("b", 120))
    }
    config = DataConfig(
        name="loader_test",
        sources={
            "a": SourceConfig(kind="jsonl", paths=["unused"], weight=0.7),
            "b": SourceConfig(kind="jsonl", paths=["unused"], weight=0.3),
        },
        packing=PackingConfig(seq_len=SEQ_LEN, long_threshold=60, long_share=0.2, window_docs=64),
        max_repetition=100.0,
        seed=seed,
    )
    return MixtureDataset(
        config, pad_id=PAD, tokenizer_fingerprint=None, planned_samples=planned, stores=stores
    )


@pytest.fixture(scope="module")
def dataset() -> MixtureDataset:
    return make_dataset()


def rows_of(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in torch.cat([batch["input_ids"], batch["labels"]], dim=1)]


def expected_rows(dataset: MixtureDataset, indices: range) -> list[tuple[int, ...]]:
    return rows_of(collate([dataset[i] for i in indices]))


def assert_batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_batch_format(dataset: MixtureDataset) -> None:
    batch = GlobalBatchLoader(dataset, rank=0, world_size=1).next_batch(6)
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    for value in batch.values():
        assert value.shape == (6, SEQ_LEN)
    sample = dataset[0]
    assert batch["input_ids"][0].tolist() == sample["tokens"][:-1].tolist()
    docs = sample["document_ids"]
    masked = (docs[1:] < 0) | (docs[1:] != docs[:-1])  # padding, or the first token of the next segment
    labels = batch["labels"][0].numpy()
    assert (labels[masked] == IGNORE_INDEX).all()
    assert (labels[~masked] == sample["tokens"][1:][~masked]).all()
    assert batch["position_ids"][0].tolist() == sample["position_ids"][:-1].tolist()
    assert (batch["document_ids"] >= -1).all()


@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_equals_uninterrupted_run(dataset: MixtureDataset, prefetch: bool) -> None:
    sizes = [8, 8, 16, 8, 4, 8]
    with GlobalBatchLoader(dataset, rank=1, world_size=2, prefetch=prefetch) as straight:
        reference = [straight.next_batch(b) for b in sizes]
    with GlobalBatchLoader(dataset, rank=1, world_size=2, prefetch=prefetch) as first:
        for b in sizes[:3]:
            first.next_batch(b)
        state = first.state_dict()
    assert state["position"] == 32
    resumed_dataset = make_dataset()  # a fresh process builds the dataset again
    with GlobalBatchLoader(resumed_dataset, rank=1, world_size=2, prefetch=prefetch) as resumed:
        resumed.load_state_dict(state)
        for b, expected in zip(sizes[3:], reference[3:], strict=True):
            assert_batches_equal(resumed.next_batch(b), expected)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_make_the_same_global_batch(dataset: MixtureDataset, world_size: int) -> None:
    loaders = [GlobalBatchLoader(dataset, rank=r, world_size=world_size) for r in range(world_size)]
    position = 0
    for global_batch in (8, 16, 4):
        union = [row for loader in loaders for row in rows_of(loader.next_batch(global_batch))]
        assert union == expected_rows(dataset, range(position, position + global_batch))
        position += global_batch
    assert all(loader.position == position for loader in loaders)


def test_batch_size_changes_neither_skip_nor_repeat(dataset: MixtureDataset) -> None:
    loaders = [GlobalBatchLoader(dataset, rank=r, world_size=2) for r in range(2)]
    consumed: list[int] = []
    for global_batch in (8, 8, 16, 4):
        for loader in loaders:
            consumed.extend(loader.rank_indices(global_batch))
            loader.next_batch(global_batch)
    assert sorted(consumed) == list(range(36))
    assert loaders[0].position == 36


def test_indivisible_batch_is_a_clear_error(dataset: MixtureDataset) -> None:
    loader = GlobalBatchLoader(dataset, rank=0, world_size=4)
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        loader.next_batch(10)
    assert loader.position == 0
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchLoader(dataset, rank=2, world_size=2)


def test_changed_dataset_is_detected_on_resume(dataset: MixtureDataset) -> None:
    loader = GlobalBatchLoader(dataset, rank=0, world_size=1)
    loader.next_batch(4)
    state = loader.state_dict()
    other = make_dataset(seed=99)
    with pytest.raises(ValueError, match="fingerprint"):
        GlobalBatchLoader(other, rank=0, world_size=1).load_state_dict(state)
    lenient = GlobalBatchLoader(other, rank=0, world_size=1, fingerprint_policy="warn")
    lenient.load_state_dict(state)
    assert lenient.position == 4
    with pytest.raises(ValueError, match="position"):
        lenient.load_state_dict({"position": -3})


def test_prefetch_does_not_change_results(dataset: MixtureDataset) -> None:
    plain = GlobalBatchLoader(dataset, rank=0, world_size=2)
    with GlobalBatchLoader(dataset, rank=0, world_size=2, prefetch=True) as fetching:
        for b in (8, 8, 4, 4, 16):
            assert_batches_equal(plain.next_batch(b), fetching.next_batch(b))
        fetching.load_state_dict({"position": 4, "dataset_fingerprint": dataset.fingerprint()})
        plain.position = 4
        assert_batches_equal(plain.next_batch(8), fetching.next_batch(8))


def test_labels_stay_inside_segments() -> None:
    # Two segments (ids 0 and 1) and two tokens of padding: the label at each segment's last token and every
    # label on or into padding is masked.
    sample = {
        "tokens": np.array([5, 6, 7, 8, 9, PAD, PAD]),
        "position_ids": np.array([0, 1, 2, 0, 1, 0, 1]),
        "document_ids": np.array([0, 0, 0, 1, 1, -1, -1], dtype=np.int32),
    }
    batch = collate([sample])
    assert batch["labels"][0].tolist() == [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, PAD]


def test_micro_batches(dataset: MixtureDataset) -> None:
    batch = GlobalBatchLoader(dataset, rank=0, world_size=1).next_batch(8)
    micro = split_micro_batches(batch, 2)
    assert len(micro) == 4
    assert torch.equal(torch.cat([m["input_ids"] for m in micro]), batch["input_ids"])
    with pytest.raises(ValueError, match="micro"):
        split_micro_batches(batch, 3)
