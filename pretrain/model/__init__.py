"""The LLaMA-style decoder and what describes it. It imports only torch and the standard library, so the model
reads (and runs) without Hydra, DeepSpeed or the data pipeline: `from pretrain.model import ModelConfig,
Transformer`."""

from pretrain.model.config import ModelConfig, ModelConfigError
from pretrain.model.transformer import Transformer

__all__ = ["ModelConfig", "ModelConfigError", "Transformer"]
