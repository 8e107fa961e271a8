"""Weight-only quantization (models/quant.py): error bounds from the definitions, the
dequantize-in-the-matmul path against the dequantized float model, logit KL, quantized
checkpoints, and QLoRA in the training loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qilin_jax
from qilin_jax.checkpoint import load_pretrained, save_pretrained
from qilin_jax.models import lora as L
from qilin_jax.models import quant as Q
from tests.infer_fixtures import random_model, tiny_config


def _w(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=shape).astype(np.float32) * 0.05  # heavy-ish tails, like weights
    w[..., 3, :] = 0.0  # an all-zero row (every group / channel has one zero)
    w[..., :, 5] = 0.0  # and an all-zero column: its scale is 0
    return w


def test_pack_unpack_round_trip():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(3, 64, 5)), jnp.uint8)
    packed = Q._pack(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 32, 5)
    np.testing.assert_array_equal(Q._unpack(packed), codes)


def test_int8_per_channel_bound():
    w = _w((2, 256, 48))
    codes, scale = Q.quantize(jnp.asarray(w), "int8")
    assert codes.dtype == jnp.int8 and scale.shape == (2, 1, 48)
    s = np.max(np.abs(w), axis=-2, keepdims=True) / 127
    np.testing.assert_allclose(scale, s, rtol=1e-6)
    err = np.abs(np.asarray(Q.dequantize(codes, scale, "int8")) - w)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-12)
    assert np.abs(np.asarray(codes)).max() == 127 and np.all(np.asarray(codes)[..., 5] == 0)


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_4bit_bounds_and_nearest_level(kind):
    w = _w((2, 256, 40), seed=1)
    g = Q.GROUP if kind == "int4" else Q.BLOCK
    codes, scale = Q.quantize(jnp.asarray(w), kind)
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 128, 40) and scale.shape == (2, 256 // g, 40)
    deq = np.asarray(Q.dequantize(codes, scale, kind))
    blocks = w.reshape(2, 256 // g, g, 40)
    absmax = np.abs(blocks).max(axis=2)
    if kind == "int4":
        np.testing.assert_allclose(scale, absmax / 7, rtol=1e-6)
        bound = (absmax / 7 / 2)[:, :, None, :]
    else:
        np.testing.assert_allclose(scale, absmax, rtol=0)
        # Each value is absmax times its nearest NF4 level (brute force over the 16 levels).
        x = blocks / np.where(absmax > 0, absmax, 1)[:, :, None, :]
        nearest = Q.NF4_LEVELS[np.argmin(np.abs(x[..., None] - Q.NF4_LEVELS), axis=-1)]
        np.testing.assert_allclose(deq.reshape(blocks.shape), nearest * absmax[:, :, None, :], rtol=1e-6, atol=1e-9)
        bound = (absmax * np.max(np.diff(Q.NF4_LEVELS)) / 2)[:, :, None, :]
    err = np.abs(deq.reshape(blocks.shape) - blocks)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-12)
    assert np.all(deq[..., 3, :] == 0) and np.all(deq[..., 5] == 0)  # zeros stay exact


def test_bad_shapes_and_kinds():
    with pytest.raises(ValueError, match="multiple of the group"):
        Q.quantize(jnp.zeros((96, 8)), "int4")
    codes, scale = Q.quantize(jnp.ones((192, 8)), "int4")  # 192: groups of 64
    assert scale.shape == (3, 8)
    np.testing.assert_array_equal(Q.dequantize(codes, scale, "int4"), np.ones((192, 8)))
    with pytest.raises(ValueError, match="unknown kind"):
        Q.quantize(jnp.zeros((128, 8)), "fp3")


def qcfg():
    """A tiny model wide enough for int4's groups of 128."""
    cfg = tiny_config()
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, hidden_size=128, intermediate_size=256, head_dim=None)
    )


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text.vocab_size, size=(2, 24))
    ids[:, 2 : 2 + cfg.image_tokens] = cfg.image_token_id
    px = rng.normal(size=(2, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, px


def _peaky(model):
    """Random weights give near-uniform logits; a larger head makes the KL test meaningful."""
    model.llm.lm_head.set_value(model.llm.lm_head.get_value() * 40)
    return model


@pytest.fixture(scope="module")
def float_model():
    return _peaky(random_model(qcfg(), seed=3))


def _clone(model):
    g, s = nnx.split(model)
    return nnx.merge(g, jax.tree.map(jnp.array, s))


@pytest.mark.parametrize("kind", Q.KINDS)
def test_quantized_model_equals_its_dequantized_float_twin(float_model, kind):
    """The on-the-fly dequantization in the matmul is exactly the float model with the
    dequantized weights (logits and greedy decoding through the CPU decode path)."""
    qm = Q.quantize_model(_clone(float_model), kind)
    assert Q.model_kind(qm) == kind
    twin = _clone(float_model)
    for t in Q.TARGETS:
        p = getattr(qm.llm.layers, f"{t}_{kind}").get_value()
        s = getattr(qm.llm.layers, t + Q.SCALE).get_value()
        getattr(twin.llm.layers, t).set_value(Q.dequantize(p, s, kind))
    ids, px = _inputs(qcfg())
    a, b = np.asarray(qm(ids, px).logits), np.asarray(twin(ids, px).logits)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ga = qilin_jax.generate(qm, ids, px, max_new_tokens=6)
    gb = qilin_jax.generate(twin, ids, px, max_new_tokens=6)
    np.testing.assert_array_equal(ga, gb)


def _kl(p_logits, q_logits):
    lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))


def test_quantized_logits_close_to_float(float_model):
    ids, px = _inputs(qcfg(), seed=1)
    ref = np.asarray(float_model(ids, px).logits)
    ent = float(jnp.mean(-jnp.sum(jax.nn.softmax(ref, -1) * jax.nn.log_softmax(ref, -1), -1)))
    assert ent < 0.8 * np.log(qcfg().text.vocab_size)  # peaky enough to tell the kinds apart
    out = {k: np.asarray(Q.quantize_model(_clone(float_model), k)(ids, px).logits) for k in Q.KINDS}
    kls = {k: _kl(ref, v) for k, v in out.items()}
    rel = {
        k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))) for k, v in out.items()
    }
    agree = {k: float(np.mean(v.argmax(-1) == ref.argmax(-1))) for k, v in out.items()}
    # Per weight, int8's rounding noise is ~0.7% of the weights' spread and 4-bit's ~10%
    # (step absmax/127 vs absmax/7 over a Gaussian group); the logits follow, and KL with
    # the square of it. Random weights are no better than Gaussian: these are loose bounds.
    assert rel["int8"] < 0.03 and rel["int4"] < 0.3 and rel["nf4"] < 0.3, rel
    assert kls["int8"] < 0.02 and kls["int8"] * 20 < min(kls["int4"], kls["nf4"]), kls
    assert rel["nf4"] <= rel["int4"] * 1.1, rel  # NF4 (blocks of 64, normal levels) >= int4 (128)
    assert agree["int8"] >= 0.9, agree


def test_quantized_checkpoint_round_trip(float_model, tmp_path):
    cfg = qcfg()
    save_pretrained(float_model, cfg, tmp_path / "f")
    ids, px = _inputs(cfg, seed=2)
    qm = load_pretrained(tmp_path / "f", quantize="nf4")  # quantized on load
    want = np.asarray(Q.quantize_model(_clone(float_model), "nf4")(ids, px).logits)
    np.testing.assert_array_equal(np.asarray(qm(ids, px).logits), want)
    save_pretrained(qm, cfg, tmp_path / "q")  # stored quantized: uint8 codes + float32 scales
    back = load_pretrained(tmp_path / "q", dtype="bfloat16")
    codes = back.llm.layers.q_proj_nf4.get_value()
    assert codes.dtype == jnp.uint8 and back.llm.layers.q_proj_qscale.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(codes, qm.llm.layers.q_proj_nf4.get_value())
    f32 = load_pretrained(tmp_path / "q")
    np.testing.assert_array_equal(np.asarray(f32(ids, px).logits), want)
    with pytest.raises(Exception, match="re-quantized"):
        load_pretrained(tmp_path / "q", quantize="int8")
    # A quantized model carries LoRA adapters too (QLoRA's result).
    L.add_lora(f32, rank=2, alpha=4.0)
    save_pretrained(f32, cfg, tmp_path / "ql")
    ql = load_pretrained(tmp_path / "ql")
    assert L.has_lora_module(ql.llm.layers) and Q.model_kind(ql) == "nf4"
    # B = 0: the same function (the added zero term only changes XLA's fusion and rounding)
    np.testing.assert_allclose(np.asarray(ql(ids, px).logits), want, rtol=1e-5, atol=1e-4)


def test_qlora_in_the_training_loop(tmp_path_factory):
    """model.quantize=nf4: stage 1 trains the projector over the quantized LLM, stage 2 LoRA
    (QLoRA); the quantized base stays bit-identical and quantized, the adapters train."""
    from qilin_jax.config import load_config
    from qilin_jax.train.loop import run_training
    from tests.train_helpers import base_config, make_data, write_config

    tmp = tmp_path_factory.mktemp("qlora")
    data = make_data(tmp_path_factory.getbasetemp() / "demo_data")
    raw = base_config(data, tmp / "runs", steps=(2, 2), every_steps=2)
    raw["model"]["quantize"] = "nf4"
    raw["stages"][1].update(lora=True, trainable=["adapter/.*"])
    raw["train"] = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.05}}
    cfg = load_config(write_config(tmp / "cfg.yaml", raw))
    r1, r2 = run_training(cfg)
    assert np.isfinite(r1.losses).all() and np.isfinite(r2.losses).all()
    s1, s2 = (nnx.state(load_pretrained(r.final_dir), nnx.Param).to_pure_dict() for r in (r1, r2))
    l1, l2 = s1["llm"]["layers"], s2["llm"]["layers"]
    assert "q_proj" not in l1 and l1["q_proj_nf4"].dtype == jnp.uint8
    for k, v in l1.items():
        np.testing.assert_array_equal(l2[k], v)
    assert all(np.abs(l2[t + "_lora_b"]).max() > 0 for t in L.TARGETS)
    assert not np.array_equal(s1["adapter"]["linear_1"], s2["adapter"]["linear_1"])


def test_qlora_holds_the_frozen_base_in_the_compute_dtype():
    """Under bf16 compute a QLoRA stage keeps its frozen float parameters in bf16 (the codes
    stay integer, the scales and what trains float32)."""
    import dataclasses as dc

    from qilin_jax import sharding as S
    from qilin_jax.config import LoraConfig, RunConfig, StageConfig
    from qilin_jax.train import loop as TL
    from qilin_jax.train.lora import prepare_stage

    cfg = dc.replace(tiny_config(), dtype="bfloat16")
    mesh = S.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    parts = TL.model_parts(cfg, mesh, S.DEFAULT_RULES)
    params = TL.init_params(parts, 0, None, mesh, S.DEFAULT_RULES)
    run = RunConfig()
    run.model.quantize = "nf4"
    run.train.lora = LoraConfig(rank=2, alpha=4.0)
    st = StageConfig(name="s", trainable=["adapter/.*"], lora=True)
    parts2, p2, _, _, _ = prepare_stage(run, st, parts, params, mesh, S.DEFAULT_RULES)
    lay = p2["llm"]["layers"]
    assert lay["q_proj_nf4"].dtype == jnp.uint8 and lay["q_proj_qscale"].dtype == jnp.float32
    assert lay["q_proj_lora_a"].dtype == jnp.float32 and p2["adapter"]["linear_1"].dtype == jnp.float32
    assert lay["attn_norm"].dtype == jnp.bfloat16 and p2["vision"]["patch_embed"].dtype == jnp.bfloat16
    assert p2["llm"]["embed_tokens"].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: None, parts2.abstract, p2)  # the model's structure
