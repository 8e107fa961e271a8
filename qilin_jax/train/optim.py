"""Per-stage optimisation: HF-Trainer warmup-cosine schedule, AdamW, clipping, trainable masks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF Trainer: ceil(warmup_ratio * total_steps)."""
    return int(math.ceil(warmup_ratio * total_steps))


def warmup_cosine(peak_lr: float, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0):
    """lr(step) equal to `transformers.get_cosine_schedule_with_warmup` (step = updates done)."""
    warm = warmup_steps(total_steps, warmup_ratio)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        up = step / max(1, warm)
        progress = (step - warm) / max(1, total_steps - warm)
        cos = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        cos = min_lr_ratio + (1.0 - min_lr_ratio) * cos
        return peak_lr * jnp.where(step < warm, up, cos)

    return schedule


class GuardedAdamW(NamedTuple):
    """Global-norm clipping + AdamW, the update computed from the new moments, with the
    non-finite guard inside.

    `reference` is the plain optax chain `clip_by_global_norm(max_norm) -> adamw(...)`: `init`
    is its init (the same state pytree, so checkpoints do not depend on which one wrote them),
    and with `finite` true `update` gives bit for bit its updates and state (tested). Two things
    differ, both for the compiled program:
    - `update(grads, state, params, finite=)` takes the step's non-finite verdict: where it is
      false the returned state is the old one and the updates are zeros, so the caller does not
      select between two whole optimizer states afterwards;
    - the new moments are materialised (`optimization_barrier`) before the parameter update is
      computed from them. Without that, XLA:CPU (which has no multi-output sibling fusion) fuses
      the moment update into each consumer: three passes recompute the moments from the old
      ones, and the buffers updated in place need whole copies of mu and nu first, ~18 reads and
      writes of every parameter-sized array per step instead of ~10 (measured by
      `bench/optimizer.py`; docs/performance.md).
    """

    init: Callable
    update: Callable
    reference: optax.GradientTransformation


def keep_where(finite, new, old):
    """`new` where `finite` (a scalar bool) holds, else `old`, leaf by leaf: a step's update is
    kept only when its loss and gradients were finite."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def _optax_tree(name: str):
    """optax's tree helper `name` (`optax.tree.<name>`; `optax.tree_utils.tree_<name>` in older
    optax releases, e.g. on images with their own optax)."""
    tree = getattr(optax, "tree", None)
    if tree is not None and hasattr(tree, name):
        return getattr(tree, name)
    return getattr(optax.tree_utils, "tree_" + name)


_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


def scale_by_path(updates, lr_scales):
    """`updates` times the multiplier of the first (regex, multiplier) of `lr_scales` whose
    regex fully matches the parameter's path (1 where none does)."""
    rx = [(re.compile(p), float(m)) for p, m in lr_scales]

    def one(path, u):
        name = path_str(path)
        m = next((m for r, m in rx if r.fullmatch(name)), 1.0)
        return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates)


def guarded_adamw(
    schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
    eps_root: float = 0.0,
    lr_scales=(),
) -> GuardedAdamW:
    """`GuardedAdamW` for these hyper-parameters (`max_grad_norm` <= 0: no clipping).

    lr_scales: (path regex, multiplier) pairs: those parameters' learning rate is the schedule's
    times the multiplier (torch param groups with their own lr under one LambdaLR; clipping is
    over all parameters together, as in HF Trainer). `reference` ignores them."""
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else None
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
    reference = optax.chain(clip, adamw) if clip is not None else optax.chain(adamw)

    def update(grads, state, params, *, finite=True):
        clip_state, adamw_state = state if clip is not None else (None, state[0])
        if clip is not None:
            grads, _ = clip.update(grads, clip_state)
        adam, wd_state, sched = adamw_state
        finite = jnp.asarray(finite)
        # The same expressions as optax.scale_by_adam / add_decayed_weights / scale_by_schedule.
        mu = keep_where(finite, _optax_tree("update_moment")(grads, adam.mu, b1, 1), adam.mu)
        nu = keep_where(finite, _optax_tree("update_moment_per_elem_norm")(grads, adam.nu, b2, 2), adam.nu)
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        count_inc = _safe_increment(adam.count)
        mu_hat = _optax_tree("bias_correction")(mu, b1, count_inc)
        nu_hat = _optax_tree("bias_correction")(nu, b2, count_inc)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        if weight_decay:
            updates = jax.tree.map(lambda g, p: g + weight_decay * p, updates, params)
        step_size = -1 * schedule(sched.count)
        if lr_scales:
            updates = scale_by_path(updates, lr_scales)
        updates = jax.tree.map(
            lambda g: jnp.where(finite, jnp.array(step_size, dtype=g.dtype) * g, jnp.zeros_like(g)), updates
        )
        adam = adam._replace(count=jnp.where(finite, count_inc, adam.count), mu=mu, nu=nu)
        sched = sched._replace(count=jnp.where(finite, _safe_increment(sched.count), sched.count))
        inner = (adam, wd_state, sched)
        return updates, ((clip_state, inner) if clip is not None else (inner,))

    return GuardedAdamW(reference.init, update, reference)


def make_optimizer(stage, total_steps: int, lr_scales=()) -> tuple[GuardedAdamW, callable]:
    """AdamW + global-norm clipping with the stage's schedule; returns (tx, schedule).
    `lr_scales`: per-path learning-rate multipliers (`guarded_adamw`).

    `tx` is a `GuardedAdamW`: optax's `clip_by_global_norm -> adamw` in state and numbers, with
    the train step's non-finite guard folded into the update (`tx.reference` is the plain chain).
    """
    schedule = warmup_cosine(stage.learning_rate, total_steps, stage.warmup_ratio, stage.min_lr_ratio)
    tx = guarded_adamw(
        schedule,
        b1=stage.b1,
        b2=stage.b2,
        eps=stage.eps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        lr_scales=tuple(lr_scales),
    )
    return tx, schedule


def path_str(path) -> str:
    """'a/b/c' for a jax key path."""
    out = []
    for p in path:
        out.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "/".join(out)


def trainable_mask(params: dict, patterns: Iterable[str]) -> dict:
    """A bool pytree: True where the parameter path fully matches one of `patterns`."""
    rx = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda path, _: any(r.fullmatch(path_str(path)) for r in rx), params)


def partition(params: dict, mask: dict) -> tuple[dict, dict]:
    """Split a nested dict into (trainable, frozen) nested dicts by a bool mask of the same shape."""

    def split(p, m):
        if isinstance(p, dict):
            t, f = {}, {}
            for k in p:
                tk, fk = split(p[k], m[k])
                if tk is not None:
                    t[k] = tk
                if fk is not None:
                    f[k] = fk
            return (t or None), (f or None)
        return (p, None) if m else (None, p)

    t, f = split(params, mask)
    return t or {}, f or {}


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`: one nested dict."""
    out = {k: v for k, v in frozen.items()}
    for k, v in trainable.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = combine(v, out[k])
        else:
            out[k] = v
    return out


def check_patterns(params: dict, patterns: Iterable[str], where: str) -> None:
    """Every pattern must match at least one parameter (catches typos like 'adaptor/.*')."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pat in patterns:
        r = re.compile(pat)
        if not any(r.fullmatch(p) for p in paths):
            raise ValueError(
                f"{where}: trainable pattern {pat!r} matches no parameter; parameter paths look like {paths[:3]} ..."
            )
