"""Small shared pieces: parameter creation with logical axes, norms, dtype helpers, remat."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, shape, axes, *, std: float | None = 0.02, value: float | None = None):
    """A float32 nnx.Param with logical `axes` metadata: normal(std) or a constant `value`."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if value is not None:
        x = jnp.full(shape, value, jnp.float32)
    else:
        x = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(x, axes=tuple(axes))


def dense(x, kernel):
    """`x @ kernel` for x [..., in] and kernel [in, out] as one 2-D matmul.

    Leading axes are flattened first: XLA:CPU ran the weight gradient of the 3-D form (a dot
    contracting batch and sequence together) far slower than a plain matmul (docs/performance.md).
    """
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*lead, kernel.shape[-1])


def dense_t(x, kernel_t):
    """`x @ kernel_t.T` for x [..., in] and kernel_t [out, in] (the torch Linear layout).

    XLA:CPU streams a [out, in] matrix faster in a matrix-vector product (each output is a
    contiguous dot product): the decode path keeps its cached layers this way (`llama.layer_list`).
    """
    lead = x.shape[:-1]
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel_t, (((1,), (1,)), ((), ())))
    return y.reshape(*lead, kernel_t.shape[0])


def rms_norm(x, weight, eps: float, axis: int = -1):
    """LLaMA RMSNorm over the features `axis` (the last, or 0 for [features, rows] activations),
    computed in float32 and cast back as HF does."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    w = weight.astype(dtype)
    if axis % x.ndim != x.ndim - 1:
        w = w.reshape(w.shape + (1,) * (x.ndim - 1 - axis % x.ndim))
    return w * x32.astype(dtype)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis, statistics in float32."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(dtype)


def remat_policy(name: str):
    """jax.checkpoint policy for a config name ('none' returns None: no remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}")


# XLA's cost analysis counts a while loop's body once, whatever its trip count; the FLOP
# checks of bench/tpu_compile.py compile shallow models with every scan unrolled instead.
_UNROLL: contextvars.ContextVar = contextvars.ContextVar("qilin_unroll_scans", default=False)


@contextlib.contextmanager
def unrolled_scans():
    """Within this context (at trace time) the model's scans are fully unrolled."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def scan_unroll():
    """The `unroll` argument for lax.scan: 1, or True inside `unrolled_scans()`."""
    return True if _UNROLL.get() else 1


def scan_layers(body, carry, xs, *, remat: str = "none", length: int | None = None):
    """lax.scan of `body(carry, x) -> (carry, y)` over stacked layers, optionally rematerialised."""
    policy = remat_policy(remat)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, carry, xs, length=length, unroll=scan_unroll())


def stacked_values(module: nnx.Module) -> dict:
    """The Param values of a module with stacked layers, as a flat dict name -> array."""
    return {
        k: v.get_value() if hasattr(v, "get_value") else v.value
        for k, v in vars(module).items()
        if isinstance(v, nnx.Param)
    }
