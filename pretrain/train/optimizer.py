"""The AdamW the engine hands to DeepSpeed, chosen by where the optimizer state lives and what is installed."""

from __future__ import annotations

import torch

from pretrain.config import PretrainConfig


def deepspeed_fused_adam_prebuilt() -> bool:
    """Whether this DeepSpeed was installed with its FusedAdam op compiled in (DS_BUILD_FUSED_ADAM=1). Otherwise
    FusedAdam compiles at first use: it needs nvcc matching torch's CUDA, ninja and a writable extension cache,
    all local ranks wait on one file lock, and a rank killed mid-build leaves a stale lock behind."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam", False))


def build_optimizer(
    cfg: PretrainConfig, groups: list[dict], fused_adam_prebuilt: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW for the engine: DeepSpeed's CPU Adam with optimizer offload; on GPU DeepSpeed's FusedAdam where it
    was prebuilt, else torch's fused AdamW (the same update, no compiler needed); torch's AdamW on CPU."""
    opt = cfg.optim
    kwargs = {"lr": opt.lr, "betas": tuple(opt.betas), "eps": opt.eps}
    if cfg.deepspeed.offload_optimizer == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        if fused_adam_prebuilt is None:
            fused_adam_prebuilt = deepspeed_fused_adam_prebuilt()
        if fused_adam_prebuilt:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)
