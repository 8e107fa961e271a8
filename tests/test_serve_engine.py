"""The engine without HTTP: over the inference mesh (8 simulated CPU devices, tensor parallel),
its greedy tokens equal single-device `generate`, the KV cache is split over the mesh, and
nothing compiles after warm-up."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qilin_jax.infer.generate import generate
from qilin_jax.infer.sharded import inference_mesh, shard_model
from qilin_jax.serve.engine import Engine, Request, compile_count
from tests.infer_fixtures import random_model, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_sharded_engine_equals_generate(tokenizer):
    cfg = tiny_config()
    img = cfg.image_token_id
    rng = np.random.default_rng(0)
    prompts = [
        np.asarray([1, 5, 6] + [img] * cfg.image_tokens + list(rng.integers(3, 3000, k)), np.int32) for k in (3, 9, 20)
    ] + [np.asarray([1, 20, 21, 22], np.int32)]
    pixels = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(3)] + [None]
    limits = [6, 11, 4, 9]
    ref_model = random_model(cfg, seed=3)
    refs = [
        generate(ref_model, ids[None], px, max_new_tokens=n, eos_token_id=-1)[0]
        for ids, px, n in zip(prompts, pixels, limits)
    ]

    model = random_model(cfg, seed=3)  # the same weights, fresh Variables
    mesh = inference_mesh(2)  # data 4 x tensor 2
    shard_model(model, mesh)

    class NoEos:  # answers run to their limit, as generate(eos_token_id=-1)
        eos_token_id = -1

        def __len__(self):
            return len(tokenizer)

        def decode(self, toks, skip_special_tokens=True):
            return tokenizer.decode(toks, skip_special_tokens=skip_special_tokens)

    eng = Engine(model, NoEos(), slots=4, max_len=64, prompt_buckets=[32], mesh=mesh)
    spec = P("data", "tensor", None, None)  # slots over data, kv heads over tensor (CPU: chunks per layer)
    assert all(a.sharding.spec == spec for a in jax.tree.leaves(eng.k))
    eng.start()
    try:
        before = compile_count()
        reqs = [eng.submit(Request(ids, px, max_tokens=n)) for ids, px, n in zip(prompts, pixels, limits)]
        for r in reqs:
            assert r.done.wait(120)
        assert compile_count() == before
        for r, ref, n in zip(reqs, refs, limits):
            assert r.finish_reason == "length"
            np.testing.assert_array_equal(r.tokens, ref[:n])
        assert all(a.sharding.spec == spec for a in jax.tree.leaves((eng.k, eng.v)))
    finally:
        eng.stop()
