"""The accelerator inference path (stacked layers in a scan, the KV cache updated in place in
the scan carry) equals the CPU path (unstacked layers), prefill and decode, and a cache-free
forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qilin_jax.infer import generate as G
from qilin_jax.models import QilinMedVL, model_preset
from qilin_jax.models.llama import MATRICES, layer_list


def test_stacked_decode_step_equals_unstacked_and_full_forward():
    cfg = model_preset("tiny")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    B, T = 2, 12
    ids = rng.integers(3, cfg.text.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0  # left padding, as generate aligns prompts
    logits, cache, pos = G._prefill(model, jnp.asarray(ids), jnp.asarray(mask), None, slots=32)
    layers = layer_list(model.llm.layers)
    # the decode copy keeps every matrix transposed ([out, in], `<name>_t`), norms as they are
    assert set(layers[0]) == {"attn_norm", "mlp_norm"} | {m + "_t" for m in MATRICES}
    np.testing.assert_array_equal(layers[1]["down_proj_t"], model.llm.layers.down_proj.get_value()[1].T)
    assert set(layer_list(model.llm.layers, transpose=False)[0]) == {"attn_norm", "mlp_norm", *MATRICES}
    u_logits, u_cache, u_pos = G._prefill(model, jnp.asarray(ids), jnp.asarray(mask), None, slots=32, layers=layers)
    np.testing.assert_allclose(logits, u_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache.k, u_cache.k, atol=1e-6)
    np.testing.assert_array_equal(cache.mask, u_cache.mask)
    np.testing.assert_array_equal(pos, u_pos)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    a_logits, a_cache = G._step(model, tok, cache, pos + 1)
    b_logits, b_cache = G._step(model, tok, cache, pos + 1, layers)
    np.testing.assert_allclose(a_logits, b_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a_cache.k, b_cache.k, atol=1e-6)
    np.testing.assert_allclose(a_cache.v, b_cache.v, atol=1e-6)
    # Cache-free: the whole sequence at once, last position.
    full_ids = np.concatenate([ids, np.asarray(tok)[:, None]], axis=1)
    full_mask = np.concatenate([mask, np.ones((B, 1), np.int32)], axis=1)
    ref = model(full_ids, attention_mask=full_mask).logits[:, -1]
    np.testing.assert_allclose(a_logits, ref, atol=1e-4, rtol=1e-4)
