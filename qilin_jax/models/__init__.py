"""Flax NNX models of Qilin-Med-VL: CLIP ViT, adapter, LLaMA-2 decoder and their composition."""

from qilin_jax.models.configs import PRESETS, QilinConfig, TextConfig, VisionConfig, model_preset
from qilin_jax.models.qilin import QilinMedVL, QilinOutput, param_count

__all__ = [
    "PRESETS",
    "QilinConfig",
    "TextConfig",
    "VisionConfig",
    "model_preset",
    "QilinMedVL",
    "QilinOutput",
    "param_count",
]
