"""The vision-language adapter: `linear` (the paper) or `mlp2x_gelu` (the release)."""

from __future__ import annotations

import jax
from flax import nnx

from qilin_jax.models.common import dense, param


class Adapter(nnx.Module):
    """Projects vision features [.., vision_dim] to LLM embeddings [.., text_dim]."""

    def __init__(self, kind: str, vision_dim: int, text_dim: int, *, rngs: nnx.Rngs):
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"adapter must be 'linear' or 'mlp2x_gelu', got {kind!r}")
        self.kind = kind
        self.linear_1 = param(rngs, (vision_dim, text_dim), ("embed", "mlp"))
        self.linear_1_bias = param(rngs, (text_dim,), ("mlp",), value=0.0)
        if kind == "mlp2x_gelu":
            self.linear_2 = param(rngs, (text_dim, text_dim), ("mlp", "embed"))
            self.linear_2_bias = param(rngs, (text_dim,), ("norm",), value=0.0)

    def __call__(self, x):
        dtype = x.dtype
        x = dense(x, self.linear_1.get_value().astype(dtype)) + self.linear_1_bias.get_value().astype(dtype)
        if self.kind == "mlp2x_gelu":
            x = jax.nn.gelu(x, approximate=False)  # exact erf GELU, as torch nn.GELU()
            x = dense(x, self.linear_2.get_value().astype(dtype)) + self.linear_2_bias.get_value().astype(dtype)
        return x
