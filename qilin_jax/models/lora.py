"""LoRA adapters on the LLM's matrices: y = x W + scaling * (dropout(x) A) B (PEFT's LoRA).

The adapters are extra stacked parameters of the decoder layers, next to their base matrix:
`llm/layers/<name>_lora_a` [layers, in, rank] and `<name>_lora_b` [layers, rank, out], with
the logical axes of the base matrix's in/out axes (so they shard like it) and an unsharded
rank axis. Two small frozen per-layer arrays travel with them: `lora_scaling` (alpha / rank,
or alpha / sqrt(rank) with rsLoRA) and `lora_layer` (the layer index, which keys the layer's
dropout mask inside the scan over layers). A checkpoint with adapters therefore describes
itself: `qilin_jax.load_pretrained` sees the adapter arrays and builds the model with them.

`llama._proj` (the one place every decoder matmul goes through) adds `lora_delta`. Dropout is
on only inside `dropout_scope(rng, rate)` (the train step), so evaluation and inference never
drop; its masks are a function of the step's rng, the layer and the matrix.

Initialisation as PEFT: A kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zeros,
so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from qilin_jax.models.common import dense

# The decoder matrices an adapter may sit on (every nn.Linear of a LLaMA block).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
SCALING, LAYER = "lora_scaling", "lora_layer"
_PATH = "llm/layers/"

_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("qilin_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_scope(rng, rate: float):
    """Within this context (at trace time) LoRA inputs are dropped with probability `rate`,
    the masks drawn from `rng` (folded with the layer and the matrix)."""
    token = _DROPOUT.set((rng, float(rate)) if rng is not None and rate > 0 else None)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def _dropout(x, p, name: str):
    ctx = _DROPOUT.get()
    if ctx is None:
        return x
    rng, rate = ctx
    key = jax.random.fold_in(jax.random.fold_in(rng, p[LAYER].astype(jnp.int32)), TARGETS.index(name))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_delta(x, p, name: str, dtype):
    """scaling * (dropout(x) @ A) @ B for the layer's matrix `name`, or None without an adapter."""
    a = p.get(name + SUFFIX_A)
    if a is None:
        return None
    h = dense(dense(_dropout(x, p, name), a.astype(dtype)), p[name + SUFFIX_B].astype(dtype))
    return h * p[SCALING].astype(dtype)


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def resolve_targets(patterns: Iterable[str]) -> list[str]:
    """The decoder matrices whose name fully matches one of `patterns` (errors on a pattern
    that matches none, e.g. a typo)."""
    out = []
    for pat in patterns:
        rx = re.compile(pat)
        hit = [t for t in TARGETS if rx.fullmatch(t) or rx.fullmatch(_PATH + t)]
        if not hit:
            raise ValueError(f"LoRA target {pat!r} matches none of the decoder matrices {list(TARGETS)}")
        out += [t for t in hit if t not in out]
    return [t for t in TARGETS if t in out]


def init_arrays(
    layer_shapes: dict,
    *,
    rank: int,
    alpha: float,
    targets: Iterable[str] = TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
) -> dict:
    """Fresh adapter arrays {name: array} for a `llm/layers` dict of base shapes: A
    kaiming-uniform, B zeros (PEFT's init), the per-layer scaling and layer index."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    key = jax.random.PRNGKey(seed)
    out = {}
    n = None
    shapes = base_shapes(layer_shapes)
    for i, t in enumerate(resolve_targets(targets)):
        L, d_in, d_out = shapes[t]
        n = L
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] weight
        out[t + SUFFIX_A] = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, rank), jnp.float32, -bound, bound)
        out[t + SUFFIX_B] = jnp.zeros((L, rank, d_out), jnp.float32)
    out[SCALING] = jnp.full((n,), scaling(rank, alpha, use_rslora), jnp.float32)
    out[LAYER] = jnp.arange(n, dtype=jnp.float32)
    return out


def base_shapes(layer_params: dict) -> dict:
    """[layers, in, out] of each decoder matrix in a `llm/layers` dict (arrays, Params or
    shapes), whether stored plain or quantized (models/quant.py: 4-bit packs two rows a byte)."""
    shape = lambda v: tuple(getattr(v, "shape", v))
    out = {}
    for t in TARGETS:
        if t in layer_params:
            out[t] = shape(layer_params[t])
        elif t + "_int8" in layer_params:
            out[t] = shape(layer_params[t + "_int8"])
        else:
            for k in ("_int4", "_nf4"):
                if t + k in layer_params:
                    L_, half, d_out = shape(layer_params[t + k])
                    out[t] = (L_, 2 * half, d_out)
    return out


def add_lora(
    model, *, rank: int, alpha: float, targets: Iterable[str] = TARGETS, use_rslora: bool = False, seed: int = 0
):
    """`model` (a QilinMedVL) with fresh adapters on the decoder matrices `targets`; returns it."""
    layers = model.llm.layers
    if has_lora_module(layers):
        raise ValueError("the model already has LoRA adapters; merge them first (lora.merge)")
    shapes = base_shapes({k: v for k, v in vars(layers).items() if isinstance(v, nnx.Param)})
    for name, value in init_arrays(
        shapes, rank=rank, alpha=alpha, targets=targets, use_rslora=use_rslora, seed=seed
    ).items():
        setattr(layers, name, nnx.Param(value, axes=axes_of(layers, name)))
    return model


def axes_of(layers, name: str) -> tuple:
    """Logical axes of adapter array `name`: A [layers, in, rank] and B [layers, rank, out] take
    their base matrix's layers/in/out axes (they shard like it); the rank axis is unsharded."""
    if name in (SCALING, LAYER):
        return ("layers",)
    base = name[: -len(SUFFIX_A)]
    param = next(
        getattr(layers, n) for n in (base, base + "_int8", base + "_int4", base + "_nf4") if hasattr(layers, n)
    )
    ax = tuple(param.get_metadata().get("axes") or (None, None, None))
    return (ax[0], ax[1], None) if name.endswith(SUFFIX_A) else (ax[0], None, ax[2])


def has_lora_module(layers) -> bool:
    """Whether a LlamaLayers module carries adapters."""
    return isinstance(getattr(layers, SCALING, None), nnx.Param)


def is_lora_path(path: str) -> bool:
    """Whether a parameter path ('llm/layers/q_proj_lora_a') belongs to the adapters."""
    return path.startswith(_PATH) and (path.endswith((SUFFIX_A, SUFFIX_B)) or path[len(_PATH) :] in (SCALING, LAYER))


def trainable_patterns() -> list[str]:
    """Parameter-path regexes of the adapters' trained weights (A and B; not the scaling)."""
    return [re.escape(_PATH) + r".*_lora_[ab]"]


def spec_from_params(layer_params: dict) -> dict | None:
    """{rank, targets, scaling} of the adapters in a `llm/layers` dict (arrays or shapes), or None."""
    targets = [t for t in TARGETS if t + SUFFIX_A in layer_params]
    if not targets:
        return None
    shape = lambda v: tuple(getattr(v, "shape", v))
    ranks = {shape(layer_params[t + SUFFIX_A])[-1] for t in targets}
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters of different ranks {sorted(ranks)} are not supported")
    return {"rank": ranks.pop(), "targets": targets}


def attach_like(model, layer_shapes: dict):
    """`model` with zero adapters shaped as in `layer_shapes` (name -> shape of `llm/layers`,
    e.g. from a checkpoint's metadata), to be filled by a restore; returns it."""
    spec = spec_from_params(layer_shapes)
    if spec is None:
        return model
    add_lora(model, rank=spec["rank"], alpha=float(spec["rank"]), targets=spec["targets"])
    return model


def merge(params: dict) -> dict:
    """The parameter tree with every adapter folded into its matrix (W + scaling * A B) and the
    adapter arrays removed: a plain model whose logits equal the adapted one's."""
    layers = params["llm"]["layers"]
    if SCALING not in layers:
        return params
    s = layers[SCALING]
    if any(t not in layers for t in TARGETS if t + SUFFIX_A in layers):
        raise ValueError(
            "the adapters sit on a quantized LLM (QLoRA): merge them into the float "
            "base instead (load it, attach the adapters, merge), not into the quantized one"
        )
    out = {k: v for k, v in layers.items() if not is_lora_path(_PATH + k)}
    for t in TARGETS:
        if t + SUFFIX_A in layers:
            a = layers[t + SUFFIX_A].astype(jnp.float32)
            b = layers[t + SUFFIX_B].astype(jnp.float32)
            w = layers[t]
            delta = jnp.einsum("lir,lro->lio", a, b, precision="highest") * s[:, None, None].astype(jnp.float32)
            out[t] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return {**params, "llm": {**params["llm"], "layers": out}}


def split(params: dict) -> tuple[dict, dict]:
    """(the tree without adapters, {name: array} of the `llm/layers` adapter arrays)."""
    layers = params["llm"]["layers"]
    lora = {k: v for k, v in layers.items() if is_lora_path(_PATH + k)}
    base = {k: v for k, v in layers.items() if k not in lora}
    return {**params, "llm": {**params["llm"], "layers": base}}, lora
