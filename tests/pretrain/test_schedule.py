"""LR and batch schedules are functions of tokens: the formula, growth in integer multiples, and no LR shift."""

import itertools
import math

import pytest

from pretrain.schedule import BatchSchedule, LRSchedule, plan_steps


def test_lr_warmup_then_cosine_to_ten_percent():
    lr = LRSchedule(peak=1.0, warmup_tokens=100, total_tokens=1100, min_ratio=0.1)
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(0.5)
    assert lr(100) == pytest.approx(1.0)
    assert lr(600) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(1100) == pytest.approx(0.1)
    assert lr(5000) == pytest.approx(0.1)
    values = [lr(t) for t in range(100, 1101, 10)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_batch_grows_in_integer_multiples_over_the_ramp():
    batch = BatchSchedule(final=4096, start=1024, ramp_tokens=3000)
    assert batch.sizes() == [1024, 2048, 3072, 4096]
    assert batch(0) == 1024
    assert batch(999) == 1024
    assert batch(1000) == 2048
    assert batch(2000) == 3072
    assert batch(3000) == 4096
    assert batch(10**9) == 4096
    assert BatchSchedule(final=4096)(0) == 4096


def test_batch_start_must_divide_final():
    with pytest.raises(ValueError, match="integer multiple"):
        BatchSchedule(final=4096, start=1000, ramp_tokens=10)


def test_growth_does_not_shift_the_lr_curve():
    """The LR at a token count is the same whether the batch grew on the way there or not."""
    lr = LRSchedule(peak=3e-4, warmup_tokens=2048, total_tokens=65536)
    grown = plan_steps(BatchSchedule(final=4096, start=1024, ramp_tokens=16384), 65536)
    fixed = plan_steps(BatchSchedule(final=4096), 65536)
    assert sum(fixed) == 65536 and sum(grown) >= 65536
    assert len(grown) > len(fixed)
    grown_points, tokens = {}, 0
    for size in grown:
        tokens += size
        grown_points[tokens] = lr(tokens)
    tokens, shared = 0, 0
    for size in fixed:
        tokens += size
        if tokens in grown_points:
            assert grown_points[tokens] == lr(tokens)
            shared += 1
    assert shared >= 2
