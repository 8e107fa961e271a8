"""Shared helpers for the inference tests: the demo tokenizer, a tiny random model that fits it,
a small generated demo data set (PNG images, heldout.json, PMC-VQA-style CSV)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_config():
    """The tiny preset with the demo tokenizer's vocabulary (4000) and image token id (4000)."""
    from qilin_jax.models import model_preset

    cfg = model_preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=4000),
                               image_token_id=4000)


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


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "qilin_jax" / "demo_data" / "tokenizer"))


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo data set: 10 held-out samples (2 per question type), 6 CSV rows."""
    from qilin_jax.demo_data.make_demo import generate

    out = tmp_path_factory.mktemp("demo")
    generate(out, seed=0, n_align=0, n_instruct=0, n_heldout=10, n_csv=6)
    return out
