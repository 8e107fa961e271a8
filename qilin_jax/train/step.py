"""The train step: a pure function under jax.jit with explicit shardings and donated state.

Only the stage's trainable parameters are differentiated and carry optimizer state; the
frozen ones are a separate, non-donated input (no gradient is computed for them: JAX prunes
the backward pass of everything that does not depend on a trainable parameter).
Gradient accumulation scans over micro-batches: the loss is the sum of token losses over
all micro-batches divided by their total supervised tokens (HF Trainer's num_items_in_batch).
A non-finite loss or gradient never reaches the parameters: the update is dropped in the
step and reported, and the host decides to stop or go on (train.nan_policy).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qilin_jax.models.lora import dropout_scope
from qilin_jax.train.optim import GuardedAdamW, combine, keep_where

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids", "pixel_values", "image_valid")


class TrainState(NamedTuple):
    """What changes every step (and is donated): step, trainable params, optimizer state, rng."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def init_state(trainable, tx, seed: int = 0) -> TrainState:
    """A fresh TrainState for trainable params."""
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(seed))


def loss_terms(graphdef, trainable, frozen, micro, *, packed: bool, rng=None, lora_dropout: float = 0.0):
    """(sum of token losses, supervised token count) of one micro-batch (LoRA inputs dropped
    with probability `lora_dropout`, masks drawn from `rng`)."""
    model = nnx.merge(graphdef, combine(trainable, frozen))
    with dropout_scope(rng, lora_dropout):
        out = model(
            micro["input_ids"],
            micro.get("pixel_values"),
            labels=micro["labels"],
            segment_ids=micro["segment_ids"],
            position_ids=micro.get("position_ids"),
            packed=packed,
            return_logits=False,
            prefix_ids=micro.get("prefix_ids"),
        )
    n = out.num_tokens.astype(jnp.float32)
    return out.loss * n, n


def apply_gradients(tx, params, opt_state, grads, loss):
    """The optimizer half of a step: (new params, new optimizer state, gradient norm, finite).

    A non-finite loss or gradient norm leaves parameters and optimizer state as they were.
    `tx` is a `GuardedAdamW` (make_optimizer), which keeps its old state itself, or any optax
    transformation, whose state is kept here (bench/optimizer.py measures the two)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if isinstance(tx, GuardedAdamW):
        updates, new_opt = tx.update(grads, opt_state, params, finite=finite)
    else:
        updates, new_opt = tx.update(grads, opt_state, params)
        new_opt = keep_where(finite, new_opt, opt_state)
    return keep_where(finite, optax.apply_updates(params, updates), params), new_opt, grad_norm, finite


def train_step(
    graphdef, tx, schedule, state: TrainState, frozen, batch, *, packed: bool = False, lora_dropout: float = 0.0
):
    """One optimizer update over a batch with a leading micro-batch axis [accum, batch, ...]."""
    drop = {"lora_dropout": lora_dropout} if lora_dropout else {}
    grad_fn = jax.value_and_grad(functools.partial(loss_terms, graphdef, packed=packed, **drop), has_aux=True)
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro_step(carry, xs):
        g_acc, l_acc, n_acc = carry
        micro, i = xs
        rng = {"rng": jax.random.fold_in(state.rng, i)} if drop else {}  # LoRA dropout masks
        (lsum, n), g = grad_fn(state.trainable, frozen, micro, **rng)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, l_acc + lsum, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    (grads, lsum, n), _ = jax.lax.scan(
        micro_step, (zeros, jnp.zeros(()), jnp.zeros(())), (batch, jnp.arange(accum, dtype=jnp.int32))
    )
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    loss = lsum / n
    new_params, new_opt, grad_norm, finite = apply_gradients(tx, state.trainable, state.opt_state, grads, loss)
    new_state = TrainState(
        jnp.where(finite, state.step + 1, state.step), new_params, new_opt, jax.random.fold_in(state.rng, state.step)
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": n, "finite": finite}
    return new_state, metrics


def compile_train_step(
    graphdef,
    tx,
    schedule,
    *,
    state_shardings=None,
    frozen_shardings=None,
    batch_shardings=None,
    packed: bool = False,
    lora_dropout: float = 0.0,
):
    """jax.jit of train_step with explicit in/out shardings (when given) and donated state."""
    fn = functools.partial(train_step, graphdef, tx, schedule, packed=packed, lora_dropout=lora_dropout)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=(0,))
    metric_sh = jax.sharding.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        fn,
        donate_argnums=(0,),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, metric_sh),
    )


def stack_micro(batch: dict, accum: int) -> dict:
    """Reshape [accum*B, ...] host arrays to [accum, B, ...] (only the model's keys); a shared
    prefix (`prefix_ids` [P], train.shared_prefix) is the same for every micro-batch: [accum, P]."""
    out = {}
    for k in BATCH_KEYS:
        if k in batch:
            v = batch[k]
            out[k] = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
    if "prefix_ids" in batch:
        p = np.asarray(batch["prefix_ids"], np.int32)
        out["prefix_ids"] = np.broadcast_to(p, (accum,) + p.shape).copy()
    return out
