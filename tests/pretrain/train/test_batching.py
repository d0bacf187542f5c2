"""The batch layout: one computation and one check for the engine, the trainer and the planner."""

from __future__ import annotations

import pytest

from pretrain.batching import batch_layout, schedule_layouts
from pretrain.config import ConfigError, compose_pretrain_config


def test_layout_cuts_a_global_batch_into_ranks_and_micro_batches():
    layout = batch_layout(4_194_304, 4096, 1, 64, "train.global_batch_tokens")
    assert (layout.sequences, layout.per_rank, layout.accumulation) == (1024, 16, 16)


def test_batch_that_does_not_divide_names_the_key():
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens.*micro_batch_size"):
        batch_layout(3 * 64, 64, 2, 2, "train.global_batch_tokens")
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens: 3000 is not a multiple"):
        batch_layout(3000, 64, 1, 1, "train.global_batch_tokens")


def test_every_size_of_the_schedule_is_checked_once_naming_its_key():
    cfg = compose_pretrain_config(["+experiment=debug"])
    sizes = cfg.batch_schedule().sizes()
    layouts = schedule_layouts(sizes, 64, 4, 2)
    assert [layouts[s].accumulation for s in sizes] == [1, 2]
    with pytest.raises(ConfigError, match=r"^train\.start_batch_tokens"):
        schedule_layouts(sizes, 64, 4, 4)  # 512 tokens = 8 sequences do not fill 4 ranks x 4


def test_config_validation_rejects_a_batch_that_cannot_divide_on_any_world_size():
    with pytest.raises(ConfigError, match=r"train\.start_batch_tokens.*micro_batch_size=3"):
        compose_pretrain_config(["+experiment=debug", "train.micro_batch_size=3"])
