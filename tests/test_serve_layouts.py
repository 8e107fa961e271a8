"""The CPU decode step's two layer paths: feature-major for plain layers, row-major through
`_proj` for layers with LoRA adapters. Both must answer exactly as `generate` does."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qilin_jax.infer.generate import decode_layers, generate
from qilin_jax.models import lora as L
from qilin_jax.serve.engine import Engine, Request, _feature_major
from tests.infer_fixtures import random_model, tiny_config


class NoEos:  # answers run to their limit, as generate(eos_token_id=-1)
    eos_token_id = -1

    def __len__(self):
        return 4000

    def decode(self, toks, skip_special_tokens=True):
        return ""


def _prompts(cfg):
    rng = np.random.default_rng(0)
    img = cfg.image_token_id
    prompts = [
        np.asarray([1, 5, 6] + [img] * cfg.image_tokens + list(rng.integers(3, 3000, k)), np.int32) for k in (3, 9, 20)
    ] + [np.asarray([1, 20, 21, 22], np.int32)]
    pixels = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(3)] + [None]
    return prompts, pixels, [6, 11, 4, 9]


def _with_lora(cfg):
    model = random_model(cfg, seed=3)
    L.add_lora(model, rank=4, alpha=8)
    rng = np.random.default_rng(1)
    layers = model.llm.layers
    for name in vars(layers):
        if name.endswith(L.SUFFIX_B):  # B starts at zero; a nonzero B makes the adapters count
            var = getattr(layers, name)
            var.set_value(jnp.asarray(rng.normal(size=var.get_value().shape).astype(np.float32) * 0.05))
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["feature-major", "lora-row-major"])
def test_cpu_decode_paths_equal_generate(lora):
    cfg = tiny_config()
    model = _with_lora(cfg) if lora else random_model(cfg, seed=3)
    prompts, pixels, limits = _prompts(cfg)
    refs = [
        generate(model, ids[None], px, max_new_tokens=n, eos_token_id=-1)[0]
        for ids, px, n in zip(prompts, pixels, limits)
    ]
    eng = Engine(model, NoEos(), slots=4, max_len=64, prompt_buckets=[32])
    assert _feature_major(eng.layers[0]) is (not lora)
    eng.start()
    try:
        reqs = [eng.submit(Request(ids, px, max_tokens=n)) for ids, px, n in zip(prompts, pixels, limits)]
        for r in reqs:
            assert r.done.wait(120)
        for r, ref, n in zip(reqs, refs, limits):
            assert r.finish_reason == "length"
            np.testing.assert_array_equal(r.tokens, ref[:n])
    finally:
        eng.stop()


def test_lora_changes_the_answers():
    """The adapters in the LoRA case are not zero: its greedy tokens differ from the base's."""
    cfg = tiny_config()
    prompts, pixels, _ = _prompts(cfg)
    base = generate(random_model(cfg, seed=3), prompts[2][None], pixels[2], max_new_tokens=12, eos_token_id=-1)[0]
    tuned_model = _with_lora(cfg)
    tuned = generate(tuned_model, prompts[2][None], pixels[2], max_new_tokens=12, eos_token_id=-1)[0]
    layers, _ = decode_layers(tuned_model, *nnx.split(tuned_model), None)
    assert any(k.endswith(L.SUFFIX_A) for k in layers[0])
    assert not np.array_equal(base, tuned)
