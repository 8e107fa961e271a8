"""Per-stage optimisation: HF-Trainer warmup-cosine schedule, AdamW, clipping, trainable masks."""
from __future__ import annotations

import math
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF Trainer: ceil(warmup_ratio * total_steps)."""
    return int(math.ceil(warmup_ratio * total_steps))


def warmup_cosine(peak_lr: float, total_steps: int, warmup_ratio: float = 0.03,
                  min_lr_ratio: float = 0.0):
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


def make_optimizer(stage, total_steps: int) -> tuple[optax.GradientTransformation, callable]:
    """AdamW + global-norm clipping with the stage's schedule; returns (tx, schedule)."""
    schedule = warmup_cosine(stage.learning_rate, total_steps, stage.warmup_ratio, stage.min_lr_ratio)
    parts = []
    if stage.max_grad_norm and stage.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(stage.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=stage.b1, b2=stage.b2, eps=stage.eps,
                             weight_decay=stage.weight_decay))
    return optax.chain(*parts), schedule


def path_str(path) -> str:
    """'a/b/c' for a jax key path."""
    out = []
    for p in path:
        out.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "/".join(out)


def trainable_mask(params: dict, patterns: Iterable[str]) -> dict:
    """A bool pytree: True where the parameter path fully matches one of `patterns`."""
    rx = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(r.fullmatch(path_str(path)) for r in rx), params)


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
            raise ValueError(f"{where}: trainable pattern {pat!r} matches no parameter; parameter "
                             f"paths look like {paths[:3]} ...")
