"""Mesh construction and logical-axis sharding rules.

Every parameter carries logical axis names in its `axes` metadata (e.g. ("embed", "mlp")),
and the main activations are annotated with `constrain(x, axes)`. Rules map each logical
name to zero or more mesh axes; the mesh has the three axes `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: parameters FSDP-sharded over their embed dimension, tensor-parallel over
# heads / mlp / vocab; activations batch-sharded over (data, fsdp).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("patch", None),
    ("positions", None),
)

_CTX: contextvars.ContextVar = contextvars.ContextVar("qilin_sharding_ctx", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Return a Mesh with axes (data, fsdp, tensor); one size may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by data*fsdp*tensor={known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices; "
            "set one axis to -1 to take the rest"
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:  # non-TPU topologies or older jax: plain reshape keeps process locality
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: Iterable[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
        used.update(keep)
        out.append(keep[0] if len(keep) == 1 else (keep if keep else None))
    return P(*out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. 3 KV heads over tensor=2)."""
    out = []
    for dim, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if s is None:
            out.append(None)
            continue
        names = (s,) if isinstance(s, str) else tuple(s)
        keep = []
        size = 1
        for nme in names:
            if dim % (size * mesh.shape[nme]) == 0:
                keep.append(nme)
                size *= mesh.shape[nme]
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*out)


def spec_for(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` with logical `axes` on `mesh`."""
    return _fit_spec(logical_to_spec(axes, rules, mesh), tuple(shape), mesh)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for an nnx.State (or any pytree of Variables/arrays with `axes`)."""
    from flax import nnx

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("axes")
            value = x.get_value() if hasattr(x, "get_value") else x.value
            return x.replace(NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
    """Within this context, `constrain` annotates activations for `mesh`."""
    token = _CTX.set((mesh, rules) if mesh is not None else None)
    try:
        yield
    finally:
        _CTX.reset(token)


def constrain(x, axes: Sequence[str | None]):
    """Sharding constraint on an activation by logical axes; a no-op outside a mesh context."""
    ctx = _CTX.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))


def param_axes(model) -> dict:
    """Nested dict (the layout of the params pure dict) of each parameter's logical axes."""
    from flax import nnx

    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = tuple(var.get_metadata().get("axes") or ())
    return out


def tree_shardings(axes: dict, shapes: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """NamedShardings for a nested dict of arrays/ShapeDtypeStructs with a parallel axes dict."""
    if isinstance(shapes, dict):
        return {k: tree_shardings(axes[k], shapes[k], mesh, rules) for k in shapes}
    return NamedSharding(mesh, spec_for(axes, shapes.shape, mesh, rules))


def rules_with_overrides(overrides: dict | None) -> tuple:
    """DEFAULT_RULES with some logical names re-mapped (config `mesh.rules`)."""
    table = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        table[k] = tuple(v) if isinstance(v, list) else v
    return tuple(table.items())
