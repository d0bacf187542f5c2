"""The trainer: a LLaMA-style model trained with DeepSpeed ZeRO-3, driven by one Hydra config tree."""
