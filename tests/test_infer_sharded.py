"""Sharded generation on 8 simulated CPU devices: tensor parallel over heads gives the tokens of
one device, with the weights really split over the tensor axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qilin_jax.infer.generate import generate
from qilin_jax.infer.sharded import (
    inference_mesh,
    inference_sharding,
    load_for_inference,
    model_mesh,
    prepare,
    shard_model,
)
from qilin_jax.models import model_preset
from tests.infer_fixtures import random_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _inputs(cfg):
    P_ = cfg.image_tokens
    img = cfg.image_token_id
    rows = [
        [1, 5, 6] + [img] * P_ + [7, 8, 9],
        [1, 13] + [img] * P_ + [14, 15, 16, 17],
        [1, 20, 21, 22],
        [1] + [img] * P_ + [30],
    ]
    T = max(map(len, rows))
    ids = np.zeros((4, T), np.int32)
    mask = np.zeros((4, T), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    px = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    return ids, mask, px


@pytest.fixture(scope="module")
def reference():
    cfg = model_preset("tiny")
    model = random_model(cfg, seed=1)
    ids, mask, px = _inputs(cfg)
    return cfg, generate(model, ids, px, mask, max_new_tokens=10, eos_token_id=-1)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_tokens_equal_single_device(reference, tp):
    cfg, ref = reference
    model = random_model(cfg, seed=1)  # the same weights, fresh Variables
    mesh = inference_mesh(tp)
    assert dict(mesh.shape) == {"data": 8 // tp, "fsdp": 1, "tensor": tp}
    shard_model(model, mesh)
    q = model.llm.layers.q_proj.get_value()
    assert q.sharding.spec == P(None, None, "tensor")  # heads split, embed replicated
    assert q.addressable_shards[0].data.shape == (2, 64, 64 // tp)
    assert model.llm.embed_tokens.get_value().sharding.spec == P("tensor", None)  # vocab split
    assert model_mesh(model) is mesh
    ids, mask, px = _inputs(cfg)
    with inference_sharding(mesh):
        out = generate(model, ids, px, mask, max_new_tokens=10, eos_token_id=-1)
    np.testing.assert_array_equal(out, ref)


def test_prepare_and_load_for_inference_onto_mesh(reference, tmp_path):
    from qilin_jax import checkpoint

    cfg, ref = reference
    model = random_model(cfg, seed=1)  # the same weights, fresh Variables
    m, mesh = prepare(model, tensor_parallel=1)
    assert mesh is None and m is model
    checkpoint.save_pretrained(model, cfg, tmp_path / "ckpt")
    assert dict(inference_mesh(-1).shape) == {"data": 1, "fsdp": 1, "tensor": 8}  # -1: all devices
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        inference_mesh(3)
    mesh = inference_mesh(4)
    # Restored straight onto the mesh (each device reads its shards), then used as it is.
    loaded = load_for_inference(tmp_path / "ckpt", dtype="float32", tensor_parallel=4)
    m2, mesh2 = prepare(loaded, tensor_parallel=-1)
    assert mesh2 == mesh and m2.llm.layers.o_proj.get_value().sharding.spec == P(None, "tensor", None)
    ids, mask, px = _inputs(cfg)
    with inference_sharding(mesh2):
        out = generate(m2, ids, px, mask, max_new_tokens=10, eos_token_id=-1)
    np.testing.assert_array_equal(out, ref)
    # The 13B path: bf16 parameters and compute (on one device here); greedy tokens mostly agree.
    bf16 = load_for_inference(tmp_path / "ckpt", dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and bf16.llm.layers.q_proj.get_value().dtype == jnp.bfloat16
    out16 = generate(bf16, ids, px, mask, max_new_tokens=10, eos_token_id=-1)
    assert out16.shape == ref.shape and (out16[:, 0] == ref[:, 0]).mean() >= 0.5
