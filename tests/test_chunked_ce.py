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
    f = lambda c: lambda h, W: cross_entropy(h, W, lab, chunk=c)[0]
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


@pytest.mark.parametrize("chunk", [0, 8])
def test_supervised_positions_only_equals_every_position(chunk):
    """The LM head on gathered supervised positions gives the same loss, token count and
    gradients as on every position, in every branch: each budget, and a row past the
    largest budget (the every-position branch)."""
    from qilin_jax.models.qilin import loss_position_budgets

    rng = np.random.default_rng(1)
    B, T, D, V = 3, 64, 16, 50
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32)
    budgets = loss_position_budgets(T)
    assert budgets == [8, 16, 32]
    f = lambda lab, so: lambda h, W: cross_entropy(h, W, lab, chunk=chunk, supervised_only=so)[0]
    grad_so = jax.jit(
        jax.grad(lambda h, W, lab: cross_entropy(h, W, lab, chunk=chunk, supervised_only=True)[0], argnums=(0, 1))
    )
    for busiest in (3, 8, 9, 16, 30, 32, 33, 64):  # around every budget edge
        lab = np.full((B, T), -100, np.int32)
        lab[0, [5, 20, 21]] = rng.integers(0, V, 3)
        lab[1, T - busiest :] = rng.integers(0, V, busiest)  # the busiest row
        lab[2, 40:42] = rng.integers(0, V, 2)
        lab = jnp.asarray(lab)
        np.testing.assert_allclose(f(lab, True)(h, W), f(lab, False)(h, W), rtol=1e-5)
        ga = grad_so(h, W, lab)  # one compile: the budget is picked on device
        gb = jax.grad(f(lab, False), argnums=(0, 1))(h, W)
        for a, b in zip(ga, gb):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        n = cross_entropy(h, W, lab, supervised_only=True)[1]
        assert int(n) == int(np.sum(np.asarray(lab) != -100))
    # Unsupervised positions get no hidden-state gradient from the loss.
    g = jax.grad(lambda h: cross_entropy(h, W, lab, supervised_only=True)[0])(h)
    assert float(jnp.abs(g[0, :5]).max()) == 0.0 and float(jnp.abs(g[0, 5]).max()) > 0


def test_loss_position_budgets():
    from qilin_jax.models.qilin import loss_position_budgets

    assert loss_position_budgets(737) == [48, 96, 192, 376]  # ceil(737 / 16) = 47 -> 48, ...
    assert loss_position_budgets(10) == [8]  # 1/4 and 1/2 round up to the row
    assert loss_position_budgets(4) == []  # nothing smaller than the row
