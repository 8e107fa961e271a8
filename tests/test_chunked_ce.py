"""The chunked cross-entropy (custom VJP, gradients taken chunk by chunk) equals the
whole-sequence one: value, hidden-state and head gradients, frozen head (stage 1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qilin_jax.models.qilin import cross_entropy


@pytest.mark.parametrize("chunk", [16, 24])  # 24: the sequence is padded to whole chunks
def test_chunked_ce_equals_whole(chunk):
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 40, 16, 50
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32)
    lab = rng.integers(0, V, size=(B, T)).astype(np.int32)
    lab[:, :7] = -100
    lab[1, 30:] = -100
    lab = jnp.asarray(lab)
    f = lambda c: (lambda h, W: cross_entropy(h, W, lab, chunk=c)[0])
    np.testing.assert_allclose(f(chunk)(h, W), f(0)(h, W), rtol=1e-5)
    ga = jax.grad(f(chunk), argnums=(0, 1))(h, W)
    gb = jax.grad(f(0), argnums=(0, 1))(h, W)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Frozen head: only the hidden-state gradient (what stage 1 needs), same values.
    gh = jax.grad(lambda h: f(chunk)(h, W) * 2.0)(h)
    np.testing.assert_allclose(gh, 2.0 * gb[0], rtol=1e-4, atol=1e-5)
    # Under jit and inside a scan, as the train step uses it.
    gj = jax.jit(jax.grad(f(chunk), argnums=(0, 1)))(h, W)
    np.testing.assert_allclose(gj[1], gb[1], rtol=1e-4, atol=1e-5)
