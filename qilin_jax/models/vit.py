"""CLIP vision transformer (ViT-L/14-336 and smaller) in Flax NNX.

Matches `transformers.CLIPVisionModel`: patch conv without bias, class token, learned
positions, `pre_layrnorm`, pre-LN blocks with quick_gelu MLPs. Layers are stacked and run
with `lax.scan`; `__call__` stops after the layer whose hidden state is asked for, so the
last block is never computed for the LLaVA feature layer -2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qilin_jax.models.attention import attention
from qilin_jax.models.common import DTYPES, dense, layer_norm, param, scan_layers, stacked_values
from qilin_jax.models.configs import VisionConfig
from qilin_jax.sharding import constrain


def quick_gelu(x):
    """CLIP's quick_gelu: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def posemb_sincos_2d(grid: int, dim: int, temperature: float = 10000.0):
    """[1 + grid*grid, dim] 2-D sine-cosine position embeddings (zeros for the class token)."""
    if dim % 4:
        raise ValueError(f"sincos2d position embeddings need hidden_size % 4 == 0, got {dim}")
    y, x = jnp.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (jnp.arange(dim // 4) / max(1, dim // 4 - 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return jnp.concatenate([jnp.zeros((1, dim)), pe], axis=0).astype(jnp.float32)


class VisionLayers(nnx.Module):
    """All encoder blocks, parameters stacked over a leading `layers` axis."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        L, D, M = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        self.ln1_scale = param(rngs, (L, D), ("layers", "norm"), value=1.0)
        self.ln1_bias = param(rngs, (L, D), ("layers", "norm"), value=0.0)
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", param(rngs, (L, D, D), ("layers", "embed", "heads")))
            setattr(self, f"{name}_bias", param(rngs, (L, D), ("layers", "heads"), value=0.0))
        self.o_proj = param(rngs, (L, D, D), ("layers", "heads", "embed"))
        self.o_bias = param(rngs, (L, D), ("layers", "norm"), value=0.0)
        self.ln2_scale = param(rngs, (L, D), ("layers", "norm"), value=1.0)
        self.ln2_bias = param(rngs, (L, D), ("layers", "norm"), value=0.0)
        self.fc1 = param(rngs, (L, D, M), ("layers", "embed", "mlp"))
        self.fc1_bias = param(rngs, (L, M), ("layers", "mlp"), value=0.0)
        self.fc2 = param(rngs, (L, M, D), ("layers", "mlp", "embed"))
        self.fc2_bias = param(rngs, (L, D), ("layers", "norm"), value=0.0)


def _block(p, x, *, cfg: VisionConfig, dtype):
    B, T, D = x.shape
    H, hd = cfg.num_attention_heads, cfg.head_dim
    c = lambda name: p[name].astype(dtype)
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"], cfg.layer_norm_eps)
    q = (dense(h, c("q_proj")) + c("q_bias")).reshape(B, T, H, hd)
    k = (dense(h, c("k_proj")) + c("k_bias")).reshape(B, T, H, hd)
    v = (dense(h, c("v_proj")) + c("v_bias")).reshape(B, T, H, hd)
    out = attention(q, k, v, implementation="xla")
    x = x + dense(out.reshape(B, T, D), c("o_proj")) + c("o_bias")
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"], cfg.layer_norm_eps)
    h = ACTIVATIONS[cfg.hidden_act](dense(h, c("fc1")) + c("fc1_bias"))
    x = x + dense(h, c("fc2")) + c("fc2_bias")
    return constrain(x, ("batch", "act_seq", "act_embed"))


class VisionTransformer(nnx.Module):
    """CLIP ViT; `__call__` returns the hidden state of a selected layer."""

    def __init__(self, cfg: VisionConfig, *, dtype: str = "float32", remat: str = "none", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        p, C, D = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_embed = param(rngs, (p, p, C, D), ("patch", "patch", "patch", "embed"))
        self.class_embedding = param(rngs, (D,), ("embed",))
        self.position_embedding = param(rngs, (cfg.num_patches + 1, D), ("positions", "embed"))
        if cfg.position_embedding_init == "sincos2d":
            self.position_embedding.set_value(posemb_sincos_2d(cfg.image_size // p, D))
        elif cfg.position_embedding_init != "normal":
            raise ValueError(
                f"vision.position_embedding_init must be normal or sincos2d, got {cfg.position_embedding_init!r}"
            )
        self.pre_ln_scale = param(rngs, (D,), ("norm",), value=1.0)
        self.pre_ln_bias = param(rngs, (D,), ("norm",), value=0.0)
        self.layers = VisionLayers(cfg, rngs=rngs)
        self.post_ln_scale = param(rngs, (D,), ("norm",), value=1.0)
        self.post_ln_bias = param(rngs, (D,), ("norm",), value=0.0)

    def embeddings(self, pixel_values):
        """Patch + class + position embeddings after pre_layrnorm: [images, 1+patches, embed]."""
        cfg = self.cfg
        dtype = DTYPES[self.dtype]
        N, C, Hh, W = pixel_values.shape
        p = cfg.patch_size
        if Hh != cfg.image_size or W != cfg.image_size or C != cfg.num_channels:
            raise ValueError(
                f"pixel_values have shape {pixel_values.shape}; this vision tower "
                f"expects [N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]"
            )
        x = pixel_values.astype(dtype).transpose(0, 2, 3, 1)  # NHWC
        gh, gw = Hh // p, W // p
        x = x.reshape(N, gh, p, gw, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(N, gh * gw, p * p * C)
        x = dense(x, self.patch_embed.get_value().reshape(p * p * C, -1).astype(dtype))
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(dtype), (N, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.get_value().astype(dtype)
        x = layer_norm(x, self.pre_ln_scale.get_value(), self.pre_ln_bias.get_value(), cfg.layer_norm_eps)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def num_layers_for(self, layer: int) -> int:
        """How many blocks to run for hidden state `layer` (HF hidden_states index, may be < 0)."""
        n = self.cfg.num_hidden_layers
        return layer if layer >= 0 else n + 1 + layer

    def __call__(self, pixel_values, *, layer: int = -2, all_hidden_states: bool = False):
        """Hidden state `layer` [images, 1+patches, embed] (or all of them up to it, stacked)."""
        dtype = DTYPES[self.dtype]
        cfg = self.cfg
        x = self.embeddings(pixel_values)
        n = self.num_layers_for(layer)
        params = jax.tree.map(lambda a: a[:n], stacked_values(self.layers))

        def body(h, p):
            h = _block(p, h, cfg=cfg, dtype=dtype)
            return h, (h if all_hidden_states else None)

        x_out, hs = scan_layers(body, x, params, remat=self.remat)
        if all_hidden_states:
            return jnp.concatenate([x[None], hs], axis=0)
        return x_out

    def pooled(self, last_hidden):
        """CLIP pooler output: post_layernorm of the class token of the last hidden state."""
        return layer_norm(
            last_hidden[:, 0], self.post_ln_scale.get_value(), self.post_ln_bias.get_value(), self.cfg.layer_norm_eps
        )
