"""GuardedAdamW (train/optim.py) against the plain optax chain it stands for, and the train
step's non-finite guard through it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qilin_jax.config import StageConfig
from qilin_jax.train.optim import GuardedAdamW, guarded_adamw, make_optimizer, warmup_cosine
from qilin_jax.train.step import TrainState, train_step


def _tree(seed, scale=1.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "a": jax.random.normal(k[0], (7, 5)) * scale,
        "b": {"w": jax.random.normal(k[1], (3, 4, 6)) * scale, "bias": jax.random.normal(k[2], (6,)) * scale},
    }


def _assert_trees_equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "max_grad_norm,weight_decay,grad_scale",
    [
        (1.0, 0.0, 3.0),  # clipping active (the gradients' norm is ~25)
        (1.0, 0.1, 0.01),  # clipping inactive, weight decay on
        (0.0, 0.05, 3.0),  # no clipping at all
    ],
)
def test_guarded_adamw_equals_optax_chain(max_grad_norm, weight_decay, grad_scale):
    """Same state pytree as optax's clip_by_global_norm -> adamw, and bit for bit the same
    updates and state over several steps (warmup and cosine), compiled as in the train step."""
    schedule = warmup_cosine(1e-2, 10, 0.2)
    tx = guarded_adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    ref = optax.chain(
        *([optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
    )
    params = _tree(0)
    s_ours, s_ref = tx.init(params), ref.init(params)
    _assert_trees_equal(s_ours, s_ref)
    step_ours = jax.jit(lambda g, s, p: tx.update(g, s, p, finite=jnp.array(True)))
    step_ref = jax.jit(ref.update)
    p_ours = p_ref = params
    for i in range(5):
        g = _tree(10 + i, grad_scale)
        u_ours, s_ours = step_ours(g, s_ours, p_ours)
        u_ref, s_ref = step_ref(g, s_ref, p_ref)
        _assert_trees_equal(u_ours, u_ref)
        _assert_trees_equal(s_ours, s_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    _assert_trees_equal(p_ours, p_ref)
    assert not np.array_equal(np.asarray(p_ours["a"]), np.asarray(params["a"]))


def test_guarded_adamw_not_finite_keeps_the_state():
    """finite=False: the old state comes back (counts included) and the updates are zeros;
    the next finite step is the reference's next step, as if the bad one never happened."""
    schedule = warmup_cosine(1e-2, 10, 0.2)
    tx = guarded_adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
    params = _tree(0)
    u, s1 = jax.jit(lambda g, s: tx.update(g, s, params))(_tree(1), tx.init(params))
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), _tree(2))
    u_bad, s_bad = jax.jit(lambda g, s: tx.update(g, s, params, finite=jnp.array(False)))(bad, s1)
    _assert_trees_equal(s_bad, s1)
    for leaf in jax.tree.leaves(u_bad):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    g3 = _tree(3)
    _assert_trees_equal(tx.update(g3, s_bad, params), tx.reference.update(g3, s1, params))


def test_make_optimizer_gives_the_guarded_chain():
    stage = StageConfig(name="s", trainable=[".*"], learning_rate=2e-5, weight_decay=0.01)
    tx, schedule = make_optimizer(stage, 100)
    assert isinstance(tx, GuardedAdamW)
    params = _tree(0)
    _assert_trees_equal(tx.init(params), tx.reference.init(params))
    assert float(schedule(3)) == pytest.approx(2e-5)


def test_train_step_drops_a_non_finite_update():
    """train_step with the guarded optimizer: a NaN in the batch's loss leaves parameters,
    optimizer state and step count exactly as they were, and reports finite=False; a good batch
    moves them exactly as the plain optax chain with the step's old keep-selects does."""
    from flax import nnx

    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(12.0).reshape(3, 4) / 10)

    model = Lin()
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    import qilin_jax.train.step as step_mod

    def fake_loss_terms(graphdef, trainable, frozen, micro, *, packed):
        y = micro["input_ids"].astype(jnp.float32) @ trainable["w"]
        return jnp.sum(y**2) * micro["labels"][0, 0], jnp.float32(2.0)

    stage = StageConfig(name="s", trainable=[".*"], learning_rate=1e-2, warmup_ratio=0.0)
    tx, schedule = make_optimizer(stage, 10)
    orig = step_mod.loss_terms
    step_mod.loss_terms = fake_loss_terms
    try:

        def run(tx_, state, labels):
            batch = {"input_ids": jnp.ones((1, 2, 3), jnp.int32), "labels": jnp.full((1, 2, 1), labels)}
            return jax.jit(lambda s: train_step(graphdef, tx_, schedule, s, {}, batch))(state)

        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
        s_nan, m = run(tx, state, jnp.nan)
        assert not bool(m["finite"])
        _assert_trees_equal(
            (s_nan.step, s_nan.trainable, s_nan.opt_state), (state.step, state.trainable, state.opt_state)
        )
        s_good, m = run(tx, s_nan, 1.0)
        s_ref, _ = run(tx.reference, state, 1.0)  # the plain chain: the step's own keep-selects
        assert bool(m["finite"]) and int(s_good.step) == 1
        _assert_trees_equal((s_good.trainable, s_good.opt_state), (s_ref.trainable, s_ref.opt_state))
        assert not np.array_equal(np.asarray(s_good.trainable["w"]), np.asarray(params["w"]))
    finally:
        step_mod.loss_terms = orig
