"""LR and batch schedules are functions of tokens: the formula, growth in integer multiples, and no LR shift."""

import itertools
import math

import pytest

from pretrain.config import compose_pretrain_config
from pretrain.schedule import BatchSchedule, LRSchedule, count_steps, plan_steps
from tests.helpers import read_metrics


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


def reference_lr(tokens: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The recipe written out: linear warmup to `peak`, then cosine decay to `min_ratio * peak` at `total`."""
    if tokens < warmup:
        return peak * tokens / warmup
    progress = min(1.0, (tokens - warmup) / (total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_growth_does_not_shift_the_lr_curve():
    """Every step of a run whose batch grows gets the LR of the formula at the tokens consumed by the end of the
    step (as the trainer applies it), and so the LR of a fixed-batch run wherever both have consumed the same
    tokens."""
    peak, warmup, total = 3e-4, 2048, 65536
    lr = LRSchedule(peak=peak, warmup_tokens=warmup, total_tokens=total)
    grown = plan_steps(BatchSchedule(final=4096, start=1024, ramp_tokens=16384), total)
    fixed = plan_steps(BatchSchedule(final=4096), total)
    # 1024 -> 4096 over 16384 tokens: each multiple holds for 16384 / 3 tokens, so 6 steps of 1024 (to 6144),
    # 3 of 2048 (to 12288), 2 of 3072 (to 18432), then 4096 until 65536 is reached (12 steps, to 67584).
    assert grown == [1024] * 6 + [2048] * 3 + [3072] * 2 + [4096] * 12
    assert fixed == [4096] * 16
    consumed = list(itertools.accumulate(grown))
    for tokens in consumed:
        assert lr(tokens) == pytest.approx(reference_lr(tokens, peak, warmup, total, 0.1), rel=1e-12), tokens
    fixed_lr = {tokens: lr(tokens) for tokens in itertools.accumulate(fixed)}
    shared = [tokens for tokens in consumed if tokens in fixed_lr]
    assert shared == [4096, 8192, 12288]  # after the growth the grown run is 2048 tokens off the 4096 grid
    for tokens in shared:
        assert lr(tokens) == fixed_lr[tokens]


@pytest.mark.slow
def test_the_trainer_applies_the_formula_at_the_tokens_consumed(debug_run):
    """The LR each step of the real debug run logged (2 ranks, the batch grows from 512 to 1024 tokens after
    12800) is the formula at the tokens consumed by the end of that step, counted by hand from the batch sizes."""
    cfg = compose_pretrain_config(["+experiment=debug"])
    peak, warmup, total, min_ratio = 3e-3, 4096, 28160, 0.1
    assert (cfg.optim.lr, cfg.optim.warmup_tokens, cfg.train.total_tokens, cfg.optim.min_lr_ratio) == (
        peak,
        warmup,
        total,
        min_ratio,
    )
    assert (cfg.train.start_batch_tokens, cfg.train.global_batch_tokens, cfg.train.batch_ramp_tokens) == (
        512,
        1024,
        12800,
    )
    # 25 steps of 512 tokens reach 12800; then 15 steps of 1024 reach 28160.
    consumed = {step: 512 * step if step <= 25 else 12800 + 1024 * (step - 25) for step in range(1, 41)}
    logged = {m["step"]: m for m in read_metrics(debug_run) if "train/lr" in m}
    assert sorted(logged) == list(range(1, 41))
    for step, m in logged.items():
        assert m["train/tokens"] == consumed[step], step
        expected = reference_lr(consumed[step], peak, warmup, total, min_ratio)
        assert m["train/lr"] == pytest.approx(expected, rel=1e-12), step


@pytest.mark.parametrize(
    ("final", "start", "ramp", "total"),
    [(4096, 1024, 16384, 65536), (4096, 0, 0, 65536), (4096, 1024, 16384, 5000), (8192, 1024, 100_000, 300_001),
     (6144, 2048, 7, 40_000), (4096, 1024, 0, 9000), (4096, 4096, 10_000, 9000)],
)  # fmt: skip
def test_counted_steps_are_the_planned_steps(final, start, ramp, total):
    batch = BatchSchedule(final=final, start=start, ramp_tokens=ramp)
    assert count_steps(batch, total) == len(plan_steps(batch, total))
