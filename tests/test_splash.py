"""Splash attention (run by the Pallas interpreter on CPU) equals the XLA attention:
causal + packed segment ids + right padding, GQA, gradients, and under a mesh (shard_map)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")

from qilin_jax import sharding as S  # noqa: E402
from qilin_jax.models import splash  # noqa: E402
from qilin_jax.models.attention import attention, make_mask  # noqa: E402


def _inputs(B=2, T=136, H=4, KV=2, hd=32):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, 50:] = 2  # two packed samples in row 0
    seg[1, 100:] = 0  # right padding in row 1
    return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg):
    G = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    return attention(q, kk, vv, mask=make_mask(seg, seg, causal=True), implementation="xla")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_splash_matches_xla_forward_and_grad(kv_heads):
    q, k, v, seg = _inputs(KV=kv_heads)
    valid = (seg != 0)[..., None, None]  # padding rows' outputs are never used
    spl = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, causal=True, interpret=True)
    ref = lambda q, k, v: _reference(q, k, v, seg)
    np.testing.assert_allclose(np.where(valid, spl(q, k, v), 0), np.where(valid, ref(q, k, v), 0), atol=2e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(valid, f(*a), 0.0) ** 2)
    g_s = jax.grad(loss(spl), argnums=(0, 1, 2))(q, k, v)
    g_r = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_s, g_r):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_under_mesh_uses_shard_map():
    q, k, v, seg = _inputs()
    mesh = S.make_mesh(2, 2, 2, devices=jax.devices()[:8])
    with S.activation_sharding(mesh):
        out = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg, interpret=True))(q, k, v)
    valid = (seg != 0)[..., None, None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, _reference(q, k, v, seg), 0), atol=2e-5)
