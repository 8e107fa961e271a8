"""Multi-host plumbing of the training loop: jax.distributed start-up, the mesh, and turning
each process's host batch into global device arrays of one common shape."""

from __future__ import annotations

import os

import jax
import numpy as np

from qilin_jax import sharding as S
from qilin_jax.config import RunConfig
from qilin_jax.data.conversation import IGNORE_INDEX
from qilin_jax.train.shared_prefix import SEQ_KEYS, split_shared_prefix


def maybe_initialize_distributed(dcfg) -> None:
    """jax.distributed.initialize when configured or detected (SLURM, TPU pods, env vars).

    Values set in `distributed:` are passed on, the rest is auto-detected by JAX: e.g. under
    SLURM with one process per node, local_device_ids=[0,...,7] keeps all 8 GPUs (JAX's
    SLURM detection would otherwise give each process the one GPU of its local rank)."""
    if dcfg.enabled == "off" or jax.distributed.is_initialized():
        return
    kw = {
        k: v
        for k, v in dict(
            coordinator_address=dcfg.coordinator_address,
            num_processes=dcfg.num_processes,
            process_id=dcfg.process_id,
            local_device_ids=dcfg.local_device_ids,
        ).items()
        if v is not None
    }
    env = os.environ
    detected = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in env
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
        or "JAX_COORDINATOR_ADDRESS" in env
    )
    if dcfg.coordinator_address or dcfg.enabled == "on" or detected:
        jax.distributed.initialize(**kw)


def build_mesh(cfg: RunConfig):
    """The (data, fsdp, tensor) mesh of the run config and its logical-axis rules."""
    mesh = S.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return mesh, S.rules_with_overrides(cfg.mesh.rules)


def batch_shardings(mesh, rules, example: dict) -> dict:
    """Shardings of a micro-stacked global batch: dim 1 (rows) over the batch axes; the
    shared prefix (one copy for all rows) replicated."""
    out = {}
    for k, v in example.items():
        if k == "prefix_ids":
            out[k] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            continue
        spec = S.spec_for((None, "batch") + (None,) * (v.ndim - 2), v.shape, mesh, rules)
        out[k] = jax.sharding.NamedSharding(mesh, spec)
    return out


def to_global(local: dict, shardings: dict) -> dict:
    """Global jax arrays from this process's batch (multi-host: each host gives its rows;
    the replicated shared prefix is the same on every host)."""
    out = {}
    for k, v in local.items():
        sh = shardings[k]
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sh)
        else:
            out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


def common_batch(local: dict, prefix: np.ndarray | None) -> tuple[dict, dict | None]:
    """(this process's batch padded to the longest sequence bucket of all processes, and that
    batch with the shared prefix cut (`split_shared_prefix`), or None when `prefix` is None or
    some process's batch does not allow it).

    Each host's loader picks the bucket of its own rows, but a global array needs the same
    shape everywhere, and all processes must compile and run the same step (with or without
    the prefix). With several processes this is one small all-gather per step for both.
    Padding (id 0, label -100, mask/segment/position 0) is what the collator itself appends,
    so the loss does not change; it only adds columns at the end, so it does not change
    whether the prefix fits."""
    shared = None if prefix is None else split_shared_prefix(local, prefix)
    if jax.process_count() == 1:
        return local, shared
    from jax.experimental import multihost_utils

    t = local["input_ids"].shape[1]
    got = multihost_utils.process_allgather(np.array([t, shared is not None], np.int32)).reshape(-1, 2)
    t_max, fits = int(np.max(got[:, 0])), bool(np.all(got[:, 1]))
    if t_max != t:
        fill = {"labels": IGNORE_INDEX}
        local = dict(local)
        for k in SEQ_KEYS:
            if k in local:
                v = local[k]
                pad = np.full((v.shape[0], t_max - t) + v.shape[2:], fill.get(k, 0), v.dtype)
                local[k] = np.concatenate([v, pad], axis=1)
        if shared is not None:
            shared = split_shared_prefix(local, prefix)
    return local, (shared if fits else None)


def global_shape_example(local: dict) -> dict:
    """ShapeDtypeStructs of the global batch (rows of all processes)."""
    n = jax.process_count()
    return {
        k: jax.ShapeDtypeStruct(v.shape if k == "prefix_ids" else (v.shape[0], v.shape[1] * n) + v.shape[2:], v.dtype)
        for k, v in local.items()
    }


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (an all-gather with several processes)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return bool(np.any(flags))
