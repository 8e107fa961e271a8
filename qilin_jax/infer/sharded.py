"""Sharded inference: parameters tensor-parallel over heads / MLP / vocab, replicated otherwise.

Training shards parameters over `fsdp` on their embed dimension; for generation that costs an
all-gather of every weight at every decode step, so inference uses `INFERENCE_RULES`
(("embed", None)): each weight is split over `tensor` only, the batch over `data`. A 13B
model in bf16 (26 GB) fits on 2 x 40 GB or 4 x 24 GB cards this way (docs/evaluation.md).

    mesh = inference_mesh(tensor_parallel=-1)          # all devices on the tensor axis
    model = shard_model(model, mesh)                   # or load_pretrained(..., mesh=mesh, rules=INFERENCE_RULES)
    with inference_sharding(mesh):
        tokens = generate(model, ids, pixels)           # same tokens as on one device
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.sharding import Mesh

from qilin_jax.sharding import DEFAULT_RULES, activation_sharding, make_mesh, state_shardings

_OVERRIDES = {"embed": None, "batch": "data"}
INFERENCE_RULES = tuple((name, _OVERRIDES.get(name, target)) for name, target in DEFAULT_RULES)


def inference_mesh(tensor_parallel: int = -1, devices=None) -> Mesh | None:
    """A (data, fsdp=1, tensor) mesh: tensor = tensor_parallel (-1: all devices), data = the rest.

    Returns None for a single device or tensor_parallel == 1 with one device (nothing to shard).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 1:
        return None
    tp = n if tensor_parallel == -1 else tensor_parallel
    if tp < 1 or n % tp:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} does not divide the {n} devices; "
            f"choose a divisor of {n} or -1 (all devices)"
        )
    if tp == 1:
        return None  # data parallel alone does not pay for generation of one request batch
    return make_mesh(data=n // tp, fsdp=1, tensor=tp, devices=devices)


def shard_model(model: nnx.Module, mesh: Mesh | None, rules=INFERENCE_RULES) -> nnx.Module:
    """The model with its parameters placed on `mesh` by `rules` (in place; a None mesh is a no-op)."""
    if mesh is None:
        return model
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


@contextlib.contextmanager
def inference_sharding(mesh: Mesh | None, rules=INFERENCE_RULES):
    """Context in which the model's activation annotations follow `mesh` (no-op for None)."""
    if mesh is None:
        yield
        return
    with activation_sharding(mesh, rules):
        yield


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh the model's parameters live on (None when on a single device)."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def prepare(model: nnx.Module, tensor_parallel: int = 1):
    """(model, mesh): the model sharded for `tensor_parallel` unless it already lives on a mesh."""
    mesh = model_mesh(model)
    if mesh is not None:
        return model, mesh
    if tensor_parallel == 1:
        return model, None
    mesh = inference_mesh(tensor_parallel)
    return shard_model(model, mesh), mesh


def load_for_inference(
    ckpt_dir, *, dtype: str = "bfloat16", tensor_parallel: int = 1, config=None, quantize: str | None = None
):
    """A checkpoint ready for generation: parameters and compute in `dtype`, restored straight onto
    the inference mesh (tensor_parallel: 1 = one device, -1 = all devices), never whole on one device;
    `quantize` (int8/int4/nf4): the LLM's matrices weight-only quantized (models/quant.py)."""
    import dataclasses

    from qilin_jax.checkpoint import load_pretrained, read_config

    cfg = config if config is not None else read_config(ckpt_dir)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    mesh = inference_mesh(tensor_parallel) if tensor_parallel != 1 else None
    return load_pretrained(ckpt_dir, dtype=dtype, mesh=mesh, rules=INFERENCE_RULES, config=cfg, quantize=quantize)
