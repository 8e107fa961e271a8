"""The XLA attention (custom VJP, causal query blocks) equals jax.nn.dot_product_attention:
outputs and q/k/v gradients, with padding (fully masked rows), packing, GQA, per-head masks,
and query blocks that do not divide the sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qilin_jax.models import attention as A


def _qkv(B, T, H, KV, d, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(B, T, h, d)), jnp.float32) for h in (H, KV, KV)]


def _check(q, k, v, mask, causal, monkeypatch, block):
    monkeypatch.setattr(A, "CAUSAL_BLOCK", block)
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    # A query row that sees no key (padding) has an unspecified finite output (the model never
    # reads it: nothing attends to padding and its labels are ignored); compare the rest.
    seen = jnp.ones(q.shape[:2], bool) if mask is None else jnp.any(mask, axis=(1, 3))
    w = w * seen[:, :, None, None]

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            w * jnp.tanh(A.attention(q, k, v, mask=mask, causal=causal, implementation=impl))
        )

    ours = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.value_and_grad(loss("xla_reference"), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    out = A.attention(q, k, v, mask=mask, causal=causal, implementation="xla")
    assert bool(jnp.all(jnp.isfinite(out)))
    ref_out = A.attention(q, k, v, mask=mask, implementation="xla_reference")
    np.testing.assert_allclose(out * seen[:, :, None, None], ref_out * seen[:, :, None, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [0, 8, 16, 64])  # 64 > T: one block
def test_causal_padding_and_packing(block, monkeypatch):
    B, T = 3, 37
    q, k, v = _qkv(B, T, 4, 4, 8)
    seg = np.ones((B, T), np.int32)
    seg[1, 30:] = 0  # right padding: fully masked query rows
    seg[2, 12:25], seg[2, 25:] = 2, 3  # three packed samples
    seg = jnp.asarray(seg)
    _check(q, k, v, A.make_mask(seg, seg, causal=True), True, monkeypatch, block)


def test_gqa_and_per_head_mask(monkeypatch):
    B, T, H, KV = 2, 29, 6, 2
    q, k, v = _qkv(B, T, H, KV, 8, seed=1)
    seg = jnp.ones((B, T), jnp.int32)
    _check(q, k, v, A.make_mask(seg, seg, causal=True), True, monkeypatch, 8)
    per_head = jnp.asarray(np.random.default_rng(2).random((B, H, T, T)) > 0.3) | jnp.eye(T, dtype=bool)
    _check(q, k, v, per_head, False, monkeypatch, 8)  # not causal: no key blocks skipped


def test_unmasked_and_cross_lengths(monkeypatch):
    q, k, v = _qkv(2, 17, 2, 2, 4, seed=3)
    _check(q, k, v, None, False, monkeypatch, 8)  # the ViT's call
    # Queries against a longer key range (the decode cache): never blocked, mask carries causality.
    kq = _qkv(2, 40, 2, 2, 4, seed=4)
    mask = jnp.asarray(np.random.default_rng(5).random((2, 1, 17, 40)) > 0.4) | (jnp.arange(40)[None, None, None] == 0)
    monkeypatch.setattr(A, "CAUSAL_BLOCK", 8)
    np.testing.assert_allclose(
        A.attention(q, kq[1], kq[2], mask=mask, causal=True, implementation="xla"),
        A.attention(q, kq[1], kq[2], mask=mask, implementation="xla_reference"),
        rtol=1e-5,
        atol=1e-5,
    )
