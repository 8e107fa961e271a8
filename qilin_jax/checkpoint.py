"""Checkpoints: pretrained-model directories (converter output, `save_pretrained`) and, later,
training state.

A pretrained checkpoint directory:
    config.json      QilinConfig.to_dict()
    params/          an Orbax PyTree checkpoint of the parameter tree
                     ({"vision": {...}, "adapter": {...}, "llm": {...}}, stacked layers)
    tokenizer/       optional: the tokenizer files that came with the weights

`load_pretrained` also accepts a training step directory: it looks for the parameters in an
Orbax item named `params`, `state` (under a `params` key) or `default`, and for the config
in config.json / config.yaml next to it or one level up (see `find_params_item` and
`model_config_from_dict`: the hooks to extend when the training checkpoint layout is fixed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
TOKENIZER_DIR = "tokenizer"
# Orbax items that may hold the parameter tree in a training step directory, in order.
PARAMS_ITEM_CANDIDATES = ("params", "state", "default", "train_state")
# Top-level parts of the parameter tree: how a params subtree is recognised in any item.
PARTS = ("vision", "adapter", "llm")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not fit its config; names the file and fix."""


# --- config -------------------------------------------------------------------------------


def model_config_from_dict(d: dict[str, Any]):
    """A QilinConfig from a config mapping: QilinConfig.to_dict() itself, or a run config
    whose `model` section holds it, or names {"preset": name, "overrides": {...}} (the
    qilin_jax.config ModelSection; other QilinConfig fields next to `preset` override too),
    merged by the run config's own rule (qilin_jax.models.configs.from_preset)."""
    import dataclasses

    from qilin_jax.models.configs import QilinConfig, from_preset

    where = "model"
    if "model" in d and isinstance(d["model"], dict):
        d = d["model"]
    d = dict(d)
    preset = d.pop("preset", None)
    if preset is None:
        return QilinConfig.from_dict(d, where)
    fields = {f.name for f in dataclasses.fields(QilinConfig)}
    overrides = {k: v for k, v in d.items() if k in fields}
    overrides.update(d.get("overrides") or {})
    return from_preset(preset, overrides, where="model.overrides")


def read_config(ckpt_dir):
    """The QilinConfig of a checkpoint: config.json / config.yaml in the dir or one level up."""
    ckpt_dir = Path(ckpt_dir).absolute()  # Orbax needs absolute paths
    for d in (ckpt_dir, ckpt_dir.parent):
        for name in ("config.json", "config.yaml", "config.yml"):
            p = d / name
            if not p.is_file():
                continue
            if name.endswith("json"):
                data = json.loads(p.read_text())
            else:
                import yaml

                data = yaml.safe_load(p.read_text())
            if not isinstance(data, dict):
                raise CheckpointError(f"{p}: expected a mapping")
            try:
                return model_config_from_dict(data)
            except (TypeError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"{p}: not a qilin-jax model config ({e}). A PyTorch "
                    "checkpoint must be converted first: python -m converters "
                    "to-jax --src DIR --dst OUT"
                ) from None
    raise CheckpointError(
        f"{ckpt_dir}: no config.json / config.yaml here or one level up; is it "
        "a qilin-jax checkpoint (python -m converters to-jax writes one)?"
    )


# --- locating the parameter tree ----------------------------------------------------------


def orbax_tree_keys(item_dir) -> list[tuple[str, ...]]:
    """The key paths of every leaf of an Orbax PyTree checkpoint, from its _METADATA."""
    meta = Path(item_dir) / "_METADATA"
    if not meta.is_file():
        raise CheckpointError(f"{item_dir}: no Orbax _METADATA file; not an Orbax PyTree item")
    tree = json.loads(meta.read_text())["tree_metadata"]
    return [tuple(str(k["key"]) for k in entry["key_metadata"]) for entry in tree.values()]


def _split_param_keys(keys):
    """(prefix, suffix) around the 'part/.../name' paths of the params subtree, or None."""
    for key in keys:
        for i, k in enumerate(key):
            if k in PARTS and i + 1 < len(key):
                suffix = ("value",) if key[-1] == "value" else ()
                return key[:i], suffix
    return None


def find_params_item(ckpt_dir):
    """(item_dir, prefix keys, suffix keys) of the parameter tree in a checkpoint directory.

    The hook for training checkpoints: a converter output keeps it in `params/`; a training
    step directory may hold it inside another item (e.g. `state/` under `params`) and with
    nnx Variable leaves saved as {"value": array}.
    """
    ckpt_dir = Path(ckpt_dir).absolute()  # Orbax needs absolute paths
    candidates = [ckpt_dir / n for n in PARAMS_ITEM_CANDIDATES] + [ckpt_dir]
    for item in candidates:
        if not (item / "_METADATA").is_file():
            continue
        split = _split_param_keys(orbax_tree_keys(item))
        if split is not None:
            return item, split[0], split[1]
    raise CheckpointError(
        f"{ckpt_dir}: no Orbax item with the model parameters (looked in "
        f"{', '.join(n + '/' for n in PARAMS_ITEM_CANDIDATES)} and the directory itself)"
    )


def orbax_array_shapes(item_dir) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Key path -> stored shape of every array of an Orbax PyTree checkpoint (metadata only)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[key] = tuple(getattr(leaf, "shape", ()) or ())
    return out


def _config_source(ckpt_dir, config) -> str:
    return "the config passed in" if config is not None else f"config of {ckpt_dir}"


# --- save / load --------------------------------------------------------------------------


def _pure_params(model_or_state):
    from flax import nnx

    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param).to_pure_dict()
    if isinstance(model_or_state, nnx.State):
        return model_or_state.to_pure_dict()
    return model_or_state


def write_config(config, dst) -> Path:
    """Write config.json (QilinConfig.to_dict()) into dst; returns its path."""
    p = Path(dst) / CONFIG_FILE
    p.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return p


@contextlib.contextmanager
def staged_dir(dst, *, create: bool = True):
    """Yield a new temporary folder next to `dst`; when the block succeeds it replaces `dst`
    (an old `dst` is removed just before the rename), when it raises it is deleted and an old
    `dst` stays as it was: a failed or killed write never leaves something that looks like
    the finished folder. `create=False` (the non-writing processes of a multi-host save)
    yields None and does nothing."""
    dst = Path(dst)
    tmp = None
    if create:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if tmp is not None:
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            elif dst.exists() or dst.is_symlink():
                dst.unlink()
            os.replace(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model_or_state, config, dst, *, overwrite: bool = False) -> Path:
    """Write a pretrained checkpoint (params/ + config.json) that load_pretrained reads."""
    import jax
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{dst} exists and is not empty; choose another path or pass overwrite=True")
    tree = _pure_params(model_or_state)
    primary = jax.process_index() == 0
    # Written next to dst, then renamed by the primary process (staged_dir): a failed save
    # leaves nothing that looks like a checkpoint.
    with staged_dir(dst, create=primary) as tmp:
        tmp_path = Path(_broadcast_path(str(tmp) if tmp else ""))
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        ckptr.save(tmp_path / PARAMS_ITEM, args=ocp.args.PyTreeSave(tree))
        if primary:
            write_config(config, tmp_path)
    return dst


def _broadcast_path(path: str) -> str:
    """The primary process's temp path on every process (a no-op on one process)."""
    import jax

    if jax.process_count() == 1:
        return path
    import numpy as np
    from jax.experimental import multihost_utils

    buf = np.zeros(1024, np.uint8)
    raw = path.encode()
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf)
    return bytes(np.asarray(out)).rstrip(b"\0").decode()


def _nest(prefix: tuple, tree):
    for k in reversed(prefix):
        tree = {k: tree}
    return tree


def _unnest(prefix: tuple, tree):
    for k in prefix:
        tree = tree[k]
    return tree


def load_pretrained(ckpt_dir, *, dtype=None, mesh=None, rules=None, config=None, quantize=None):
    """A QilinMedVL with the weights of a checkpoint directory (config read from it).

    dtype: parameter dtype in memory (default float32, the model's master dtype; bfloat16
    halves memory for inference). mesh: restore straight onto this mesh with the shardings
    of `qilin_jax.sharding.state_shardings` (each process reads only its own shards);
    without a mesh everything lands on the first local device. config: overrides the
    checkpoint's config (e.g. to change the compute dtype or attention implementation).
    quantize: "int8" | "int4" | "nf4": the LLM's matrices quantized after loading
    (models/quant.py; without a mesh the float weights are read into host memory, never onto
    the accelerator). A checkpoint saved quantized, or with LoRA adapters, loads as such.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from qilin_jax.models import QilinMedVL

    ckpt_dir = Path(ckpt_dir).absolute()  # Orbax needs absolute paths
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    cfg = config if config is not None else read_config(ckpt_dir)
    pdt = jnp.dtype(dtype if dtype is not None else jnp.float32)

    item_dir, prefix, suffix = find_params_item(ckpt_dir)
    stored = orbax_array_shapes(item_dir)
    have = {
        k[len(prefix) : len(k) - len(suffix)]: v
        for k, v in stored.items()
        if k[: len(prefix)] == prefix and len(k) > len(prefix) and k[len(prefix)] in PARTS
    }
    # LoRA adapters stored with the weights (a LoRA training stage's output) are part of the model.
    # So are quantized matrices (a checkpoint saved after `quantize`).
    from qilin_jax.models import lora as lora_mod
    from qilin_jax.models import quant

    layer_shapes = {k[2]: v for k, v in have.items() if len(k) == 3 and k[:2] == ("llm", "layers")}
    abstract = nnx.eval_shape(
        lambda: lora_mod.attach_like(quant.attach_like(QilinMedVL(cfg, rngs=nnx.Rngs(0)), layer_shapes), layer_shapes)
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is not None:
        from qilin_jax.sharding import DEFAULT_RULES, state_shardings

        shardings = state_shardings(params, mesh, rules or DEFAULT_RULES).to_pure_dict()
    else:
        device = jax.local_devices()[0]
        one = SingleDeviceSharding(jax.devices("cpu")[0] if quantize else device)
        shardings = jax.tree.map(lambda _: one, params.to_pure_dict())
    shapes = params.to_pure_dict()

    # Check names and shapes before reading: a clear error beats Orbax's tree mismatch (and
    # Orbax would silently pad or truncate an array restored to another global shape).
    want = {tuple(str(p.key) for p in path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(shapes)}
    missing = sorted("/".join(k) for k in set(want) - set(have))
    extra = sorted("/".join(k) for k in set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{item_dir}: parameters do not fit the config ({_config_source(ckpt_dir, config)}): "
            + (f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; " if missing else "")
            + (f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}; " if extra else "")
            + "the config (adapter kind, tie_word_embeddings) and the weights disagree"
        )
    bad = [
        f"{'/'.join(k)} stored {have[k]} but the config expects {want[k]}" for k in sorted(want) if have[k] != want[k]
    ]
    if bad:
        raise CheckpointError(
            f"{item_dir}: {len(bad)} parameter shape(s) do not fit the config "
            f"({_config_source(ckpt_dir, config)}): " + "; ".join(bad[:4])
        )

    def leaf(path, sds, sh):  # quantized codes keep their integer type, their scales float32
        keep = sds.dtype != jnp.float32 or str(path[-1].key).endswith(quant.SCALE)
        t = jax.ShapeDtypeStruct(sds.shape, sds.dtype if keep else pdt, sharding=sh)
        return {"value": t} if suffix else t

    target = jax.tree_util.tree_map_with_path(leaf, shapes, shardings)
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape), target
    )
    target, restore_args = _nest(prefix, target), _nest(prefix, restore_args)
    partial = len(stored) != len(want)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = ckptr.restore(
            item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
        )
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{item_dir}: restoring the parameters failed: {e}") from e
    restored = _unnest(prefix, restored)
    if suffix:
        restored = jax.tree.map(
            lambda d: d["value"], restored, is_leaf=lambda d: isinstance(d, dict) and set(d) == {"value"}
        )
    nnx.replace_by_pure_dict(params, restored)
    model = nnx.merge(graphdef, params, rest)
    if quantize and quantize != quant.model_kind(model):
        if quant.model_kind(model) is not None:
            raise CheckpointError(
                f"{ckpt_dir}: stored quantized as {quant.model_kind(model)}; it cannot be re-quantized as {quantize}"
            )
        quant.quantize_model(model, quantize)
        state = nnx.state(model)
        if mesh is not None:
            from qilin_jax.sharding import DEFAULT_RULES, state_shardings

            nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules or DEFAULT_RULES)))
        else:
            nnx.update(model, jax.device_put(state, device))
    return model
