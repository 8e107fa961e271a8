"""Shared helpers for the inference tests: the tiny model config that fits the demo tokenizer and
a random model of it (the fixtures built from them are in tests/conftest.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_config():
    """The tiny preset with the demo tokenizer's vocabulary (4000) and image token id (4000)."""
    from qilin_jax.models import model_preset

    cfg = model_preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=4000), image_token_id=4000)


def random_model(cfg, seed: int = 0):
    """A QilinMedVL with random weights, filled from numpy (eager nnx init compiles one random
    op per parameter shape: ~10 s on a busy 2-core CPU; this takes well under a second)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qilin_jax.models import QilinMedVL

    abstract = nnx.eval_shape(lambda: QilinMedVL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name or "_scale" in name:
            value = 1.0 + 0.05 * rng.standard_normal(x.shape)
        elif "_bias" in name:
            value = 0.02 * rng.standard_normal(x.shape)
        else:
            value = 0.05 * rng.standard_normal(x.shape)
        return jnp.asarray(value, jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
