"""Numerical parity of the Flax NNX models with the `transformers` PyTorch modules."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters.mapping import nested_to_flat
from qilin_jax.models import QilinMedVL, model_preset
from qilin_jax.models.llama import LlamaModel
from qilin_jax.models.vit import VisionTransformer
from tests import torch_ref as R


def tiny(**kw):
    cfg = model_preset("tiny")
    cfg = dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size - 1, **kw)
    return cfg


class _Holder(nnx.Module):
    """Hosts a single part under the attribute name the key tables use."""

    def __init__(self, name, module):
        setattr(self, name, module)


def test_clip_vision_every_hidden_state():
    cfg = tiny()
    tm = R.build("clip", cfg)
    holder = _Holder("vision", VisionTransformer(cfg.vision, rngs=nnx.Rngs(1)))
    R.to_jax("clip", tm, holder, cfg)
    px = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(px), output_hidden_states=True)
    ours = holder.vision(jnp.asarray(px), layer=cfg.vision.num_hidden_layers, all_hidden_states=True)
    assert len(ref.hidden_states) == ours.shape[0] == cfg.vision.num_hidden_layers + 1
    for i, h in enumerate(ref.hidden_states):
        err = R.rel_err(ours[i], h.numpy())
        assert err <= 1e-5, (i, err)
    pooled = holder.vision.pooled(ours[-1])
    assert R.rel_err(pooled, ref.pooler_output.numpy()) <= 1e-5
    # layer -2 stops one block early and equals hidden_states[-2]
    assert R.rel_err(holder.vision(jnp.asarray(px), layer=-2), ref.hidden_states[-2].numpy()) <= 1e-5


LLAMA_VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "rope_linear_tied": dict(
        num_key_value_heads=1,
        rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_logits_loss_grads(variant):
    base = tiny()
    text = dataclasses.replace(base.text, **LLAMA_VARIANTS[variant])
    cfg = dataclasses.replace(base, text=text)
    tm = R.build("llama", cfg, seed=3)
    holder = _Holder("llm", LlamaModel(cfg.text, rngs=nnx.Rngs(2)))
    R.to_jax("llama", tm, holder, cfg)
    rng = np.random.default_rng(1)
    B, T = 2, 12
    ids = rng.integers(3, cfg.text.vocab_size, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 9:] = 0  # right padding
    labels = np.where(mask == 1, ids, -100)
    labels[0, :3] = -100

    out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    out.loss.backward()

    def jax_loss(model):
        from qilin_jax.models.qilin import cross_entropy, shift_labels

        seg = jnp.asarray(mask, jnp.int32)
        pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)
        h, _ = model.llm(model.llm.embed(jnp.asarray(ids)), segment_ids=seg, position_ids=pos)
        total, n = cross_entropy(h, model.llm.head_kernel(), shift_labels(jnp.asarray(labels)))
        return total / n, model.llm.logits(h)

    (loss, logits), grads = nnx.value_and_grad(jax_loss, has_aux=True)(holder)
    valid = mask.astype(bool)
    err = R.rel_err(np.asarray(logits)[valid], out.logits.detach().numpy()[valid])
    assert err <= 1e-5, err
    assert R.rel_err(loss, out.loss.item()) <= 1e-4
    ref_grads = R.torch_grads_flat("llama", tm, cfg)
    ours = nested_to_flat(nnx.state(grads, nnx.Param).to_pure_dict())
    assert set(ref_grads) == set(ours)
    for path, g in ref_grads.items():
        e = R.rel_err(ours[path], g)
        assert e <= 1e-4, (path, e)


def _llava_batch(cfg, rng):
    P = cfg.image_tokens
    img = cfg.image_token_id
    # row 0: one image; row 1: two images, right-padded shorter text
    row0 = [1, 5, 6] + [img] * P + [7, 8, 9, 10, 11, 12]
    row1 = [1, 13] + [img] * P + [14, 15] + [img] * P + [16]
    T = max(len(row0), len(row1))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for b, r in enumerate([row0, row1]):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    labels = np.where((ids != img) & (mask == 1), ids, -100)
    labels[:, :2] = -100
    px = rng.normal(size=(3, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, mask, labels, px


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llava_logits_loss_grads(dtype):
    cfg = tiny()
    tm = R.build("llava", cfg, seed=5)
    model = QilinMedVL(dataclasses.replace(cfg, dtype=dtype), rngs=nnx.Rngs(0))
    R.to_jax("llava", tm, model, cfg)
    ids, mask, labels, px = _llava_batch(cfg, np.random.default_rng(2))
    out = tm(
        input_ids=torch.from_numpy(ids),
        pixel_values=torch.from_numpy(px),
        attention_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
    )
    valid = mask.astype(bool)
    ref_logits = out.logits.detach().numpy()[valid]

    if dtype == "bfloat16":
        res = model(ids, px, mask)
        err = R.rel_err(np.asarray(res.logits, np.float32)[valid], ref_logits)
        assert err <= 2e-2, err
        return

    out.loss.backward()

    def loss_fn(m):
        r = m(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), labels=jnp.asarray(labels))
        return r.loss, r.logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    assert R.rel_err(np.asarray(logits)[valid], ref_logits) <= 1e-4
    assert R.rel_err(loss, out.loss.item()) <= 1e-4
    ref_grads = R.torch_grads_flat("llava", tm, cfg)
    ours = nested_to_flat(nnx.state(grads, nnx.Param).to_pure_dict())
    for path, g in ref_grads.items():
        if np.linalg.norm(g) == 0:  # e.g. the last vision block and post-LN: unused by layer -2
            assert np.linalg.norm(ours[path]) == 0, path
            continue
        if path.endswith("k_bias"):
            # Analytically zero (a key bias shifts every score of a query equally, softmax
            # ignores it): both sides are rounding noise, so compare absolutely.
            assert np.linalg.norm(g) < 1e-6 and np.linalg.norm(ours[path]) < 1e-6, path
            continue
        e = R.rel_err(ours[path], g)
        assert e <= 1e-4, (path, e)


def test_slot_layout_equals_flat_layout():
    """[batch, slots, 3, H, W] (training layout, with an unused slot) == [images, 3, H, W]."""
    cfg = tiny()
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    ids, mask, labels, px = _llava_batch(cfg, np.random.default_rng(3))
    flat = model(ids, px, mask).logits
    slots = np.zeros((2, 2) + px.shape[1:], np.float32)
    slots[0, 0] = px[0]
    slots[1, 0] = px[1]
    slots[1, 1] = px[2]
    slotted = model(ids, slots, mask).logits
    np.testing.assert_allclose(np.asarray(flat)[mask == 1], np.asarray(slotted)[mask == 1], rtol=1e-5, atol=1e-5)


def test_linear_adapter_against_torch_linear():
    cfg = tiny(adapter="linear")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    lin = torch.nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
    R.randomize_(lin, seed=9)
    from converters.mapping import convert_state

    flat = convert_state(
        R.state_items({"model.mm_projector." + k: v for k, v in lin.state_dict().items()}), cfg, "mm-projector"
    )
    from converters.mapping import load_into_model

    load_into_model(model, flat)
    x = np.random.default_rng(0).normal(size=(2, 5, cfg.vision.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = lin(torch.from_numpy(x)).numpy()
    assert R.rel_err(model.adapter(jnp.asarray(x)), ref) <= 1e-6


def test_13b_builds_abstractly_with_expected_counts():
    from qilin_jax.models import param_count

    counts = param_count(model_preset("qilin_med_vl_13b"))
    assert round(counts["total"] / 1e9, 2) == 13.35
    assert round(counts["llm"] / 1e9, 2) == 13.02
    assert round(counts["vision"] / 1e9, 2) == 0.30
    assert round(counts["adapter"] / 1e6, 1) == 31.5
    assert param_count(model_preset("qilin_med_vl_13b_linear"))["adapter"] == 1024 * 5120 + 5120
