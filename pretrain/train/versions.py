"""What our gradient assumes about DeepSpeed, checked when the engine starts.

The loss normalisation in `pretrain.train.engine` relies on `engine.backward(loss, scale_wrt_gas=False)` leaving
the gradient unscaled. DeepSpeed 0.18.3 added a gradient hook that still divided by the accumulation steps
(fixed in 0.18.4, its PR #7724), which made every gradient 1/(accumulation steps) too small with no error. So the
installed version is checked against the range the test suite ran on, and a tiny probe measures the gradient
scale this run will actually get. Reads of DeepSpeed internals go through `deepspeed_private`, which fails
loudly instead of silently skipping a repair when DeepSpeed moves them.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from packaging.version import Version

from data.log import get_logger

log = get_logger(__name__)

# The DeepSpeed releases the suite ran on: [minimum, maximum) (pyproject.toml pins the same range).
TESTED_DEEPSPEED = ("0.19.8", "0.20")
OVERRIDE_KEY = "deepspeed.allow_untested_version"


def tested_range() -> str:
    """The tested range as a pip requirement specifier, e.g. '>=0.19.8,<0.20'."""
    low, high = TESTED_DEEPSPEED
    return f">={low},<{high}"


def installed_deepspeed() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def check_deepspeed_version(installed: str, allow_untested: bool) -> None:
    """Stop a run on a DeepSpeed outside the tested range (its gradient scale or internals may differ),
    unless the config accepts the risk, in which case the start-up gradient probe still runs."""
    low, high = TESTED_DEEPSPEED
    if Version(low) <= Version(installed) < Version(high):
        return
    message = (
        f"DeepSpeed {installed} is installed, but this trainer was tested on deepspeed{tested_range()}; "
        f"install a tested version, or set {OVERRIDE_KEY}=true to run anyway"
    )
    if not allow_untested:
        raise RuntimeError(message)
    log.warning("%s (accepted by %s=true)", message, OVERRIDE_KEY)


def deepspeed_private(obj: Any, name: str, written_for: str) -> Any:
    """`obj.name`, a DeepSpeed internal that a repair of ours depends on, or a RuntimeError naming the
    installed DeepSpeed and the missing attribute (a repair that silently did nothing would corrupt training).
    `written_for` says which DeepSpeed the repair was written against."""
    if not hasattr(obj, name):
        raise RuntimeError(
            f"DeepSpeed {installed_deepspeed()}: {type(obj).__name__} has no attribute {name!r}, which a "
            f"repair written for DeepSpeed {written_for} needs; check that repair in pretrain/train/engine.py "
            f"against this DeepSpeed before training (tested range deepspeed{tested_range()})"
        )
    return getattr(obj, name)


class _ScaleProbe(torch.nn.Module):
    """One bias-free row of weights: loss = w . x, so the gradient of w is x, computable by hand."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x.to(self.weight.dtype)).sum()


PROBE_WIDTH = 8
PROBE_ACCUMULATION = 2


def probe_inputs(rank: int, micro: int) -> torch.Tensor:
    """Rank `rank`'s input for micro-batch `micro`: small integers, exact in bf16 and in any sum of them."""
    return torch.arange(1, PROBE_WIDTH + 1, dtype=torch.float32) * (1 + micro + 2 * rank)


def probe_ds_config(ds_config: dict[str, Any], data_parallel_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config (ZeRO stage, precision, gradient and communication dtypes, extra keys)
    resized to one sample per micro-batch and PROBE_ACCUMULATION micro-batches; without expert parallelism,
    which needs MoE layers the probe does not have (it measures the dense gradient path every parameter of
    ours takes)."""
    config = copy.deepcopy(ds_config)
    config.pop("expert_parallel", None)
    config.update(
        train_batch_size=PROBE_ACCUMULATION * data_parallel_size,
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=PROBE_ACCUMULATION,
        zero_force_ds_cpu_optimizer=False,  # the probe never steps, so torch's SGD is fine under offload
    )
    return config


def measure_gradient_scale(ds_config: dict[str, Any], world_size: int, mpu: Any = None) -> float:
    """Run the probe through a DeepSpeed engine built from `ds_config` the way `pretrain.train.engine` runs a
    global batch (explicit boundary, loss scaled by world size, `scale_wrt_gas=False`) and return the
    accumulated gradient over the hand-computed one (1.0 when DeepSpeed leaves our scale alone). With sequence
    parallelism (`mpu`, DeepSpeed's groups) every rank's gradient is a part of the sum, as a slice's is, and
    ZeRO-3's reduce-scatter still averages over every rank (its contiguous all-reduce path, taken with
    `reduce_scatter: false`, would average over the data-parallel ranks only: the probe catches that).

    A collective: every rank must call it. The global RNG is left untouched so the model's
    initialisation is the same with or without the probe."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    rank = dist.get_rank() if dist.is_initialized() else 0
    data_parallel = world_size // int(ds_config.get("sequence_parallel_size", 1))
    with torch.random.fork_rng(devices=[]):
        module = _ScaleProbe(PROBE_WIDTH)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=probe_ds_config(ds_config, data_parallel),
            mpu=mpu,
            dist_init_required=False,
        )
        try:
            for micro in range(PROBE_ACCUMULATION):
                engine.set_gradient_accumulation_boundary(micro == PROBE_ACCUMULATION - 1)
                loss = engine(probe_inputs(rank, micro).to(engine.device))
                engine.backward(loss * world_size, scale_wrt_gas=False)
            got = safe_get_full_grad(module.weight).detach().float().cpu().flatten()
        finally:
            engine.destroy()
    # Our scaling by world size cancels DeepSpeed's average over ranks: the sum of every input.
    want = sum(probe_inputs(r, m) for r in range(world_size) for m in range(PROBE_ACCUMULATION))
    return float(got @ want) / float(want @ want)


def check_gradient_scale(ds_config: dict[str, Any], world_size: int, mpu: Any = None) -> None:
    """Fail the start of a run whose DeepSpeed would scale our gradient by anything but 1 (with sequence
    parallelism, `mpu` holds DeepSpeed's groups)."""
    factor = measure_gradient_scale(ds_config, world_size, mpu)
    # The probe is exact in bf16 and fp32; a scaling bug is a factor like 1/2 or the world size.
    if abs(factor - 1.0) > 1e-3:
        raise RuntimeError(
            f"DeepSpeed {installed_deepspeed()} scales the gradient by {factor:.6g} (expected 1) with "
            f"gradient accumulation {PROBE_ACCUMULATION} over {world_size} rank(s) and "
            "backward(scale_wrt_gas=False); a factor of 1/accumulation is DeepSpeed 0.18.3's bug (fixed in 0.18.4). "
            f"Install a tested DeepSpeed ({tested_range()})"
        )
    log.info("DeepSpeed %s gradient scale checked: %.6g", installed_deepspeed(), factor)


# -- DeepSpeed internals that pretrain.train.engine's repairs edit (each written against DeepSpeed WRITTEN_FOR) ---
WRITTEN_FOR = "0.19.8"


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose groups and state the repairs edit: the one a DeepSpeed ZeRO/BF16 wrapper
    holds as `.optimizer` (DeepSpeed 0.19.8), else the engine's optimizer itself."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, ZeROOptimizer):
        return wrapper
    return deepspeed_private(wrapper, "optimizer", WRITTEN_FOR)


def zero3_fp32_partitions(engine: Any) -> list[torch.Tensor]:
    """ZeRO-3's fp32 partition of each sub-group, the keys of the inner optimizer's state (DeepSpeed 0.19.8)."""
    return deepspeed_private(engine.optimizer, "fp32_partitioned_groups_flat", WRITTEN_FOR)


def set_universal_load(engine: Any, universal: bool) -> None:
    """Whether the engine's next `load_checkpoint` reads a universal checkpoint. DeepSpeed 0.19.8 takes this
    only from its JSON config (`checkpoint.load_universal`, fixed when the engine is built) and reads it
    through the public `engine.load_universal_checkpoint()`; we set it on the parsed config, then read it back
    so that a DeepSpeed which stopped consulting that attribute fails here instead of loading the wrong way."""
    config = deepspeed_private(engine, "_config", WRITTEN_FOR)
    deepspeed_private(config, "load_universal_checkpoint", WRITTEN_FOR)
    config.load_universal_checkpoint = universal
    if engine.load_universal_checkpoint() != universal:
        raise RuntimeError(
            f"DeepSpeed {installed_deepspeed()}: engine.load_universal_checkpoint() no longer follows "
            f"_config.load_universal_checkpoint, which the universal load written for DeepSpeed {WRITTEN_FOR} sets"
        )


def checkpoint_file_names(engine: Any) -> list[str]:
    """The files `save_checkpoint` writes on this rank, by DeepSpeed 0.19.8's own naming methods and conditions
    (ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt and [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt),
    so the commit can tell this rank's files from another's."""
    names = []
    if deepspeed_private(engine, "save_non_zero_checkpoint", WRITTEN_FOR):
        names.append(os.path.basename(deepspeed_private(engine, "_get_ckpt_name", WRITTEN_FOR)("", "")))
    if deepspeed_private(engine, "save_zero_checkpoint", WRITTEN_FOR):
        names.append(os.path.basename(deepspeed_private(engine, "_get_zero_ckpt_name", WRITTEN_FOR)("", "")))
    return names
