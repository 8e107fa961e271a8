"""Map a PyTorch state dict (any format of keys.py) onto the qilin-jax parameter tree, and back.

Tensors arrive one at a time (see readers), so a stacked parameter is filled layer by
layer into a preallocated numpy buffer: memory stays near the size of the model's
parameters on the host, never two copies.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from converters import keys as K


class ConversionError(ValueError):
    """A checkpoint does not fit the model config; the message names the keys and the fix."""


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """Apply a key-table transform (torch layout -> ours)."""
    if kind == "id":
        return x
    if kind == "T":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    raise ValueError(kind)


def untransform(x: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of `transform` (ours -> torch layout)."""
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return transform(x, kind)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """'part/name' path -> shape of every parameter of a QilinConfig (abstract, no allocation)."""
    import jax
    from flax import nnx
    from qilin_jax.models import QilinMedVL

    abstract = nnx.eval_shape(lambda: QilinMedVL(config, rngs=nnx.Rngs(0)))
    pure = nnx.state(abstract, nnx.Param).to_pure_dict()
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(pure):
        out["/".join(str(p.key) for p in path)] = tuple(leaf.shape)
    return out


def _layer_count(path: str, config) -> int | None:
    if path.startswith("llm/layers/"):
        return config.text.num_hidden_layers
    if path.startswith("vision/layers/"):
        return config.vision.num_hidden_layers
    return None


def _vocab_hint(key, got, want, config) -> str:
    if "embed_tokens" in key or "lm_head" in key:
        vocab = got[0] if "embed_tokens" in key else got[1]
        return (f" The checkpoint's vocab is {vocab} but the config "
                f"says text.vocab_size={config.text.vocab_size}: 32000 is LLaMA-2/FlagAlpha (the "
                "release), 55296 ymcui Chinese-LLaMA-2, 32064 HF llava (padded); choose the "
                "matching model preset or set model.text.vocab_size.")
    return ""


def convert_state(tensors: Iterable[tuple[str, np.ndarray]], config, fmt: str, *,
                  parts: Iterable[str] | None = None, dtype=np.float32,
                  strict: bool = True) -> dict[str, np.ndarray]:
    """Flat 'part/name' -> array for the parts a checkpoint holds, from (key, tensor) pairs.

    Unknown keys and shape mismatches raise ConversionError naming the key; keys missing for
    the requested parts raise too (strict). Known buffers are skipped.
    """
    parts = set(parts) if parts is not None else None
    rows = K.compile_table(fmt, config.adapter, config.text.tie_word_embeddings, parts)
    shapes = expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    seen: dict[str, set] = {}
    unexpected = []
    for key, tensor in tensors:
        if K.is_ignored(key):
            continue
        m = K.match(key, rows)
        if m is None:
            unexpected.append(key)
            continue
        path, layer, kind, _ = m
        if kind == "tied":
            continue
        want = shapes[path]
        x = transform(np.asarray(tensor), kind)
        if layer is not None:
            n = want[0]
            if layer >= n:
                raise ConversionError(f"{key}: layer {layer} but the config has {n} layers "
                                      f"(model.{path.split('/')[0]}.num_hidden_layers)")
            if x.shape != want[1:]:
                raise ConversionError(f"{key}: shape {tuple(np.shape(tensor))} does not fit parameter "
                                      f"{path} (expects per-layer {want[1:]} after transform {kind!r})")
            if path not in out:
                out[path] = np.zeros(want, dtype)
            out[path][layer] = x
        else:
            if x.shape != want:
                raise ConversionError(f"{key}: shape {tuple(np.shape(tensor))} does not fit parameter "
                                      f"{path} (expects {want} after transform {kind!r})."
                                      + _vocab_hint(key, x.shape, want, config))
            out[path] = np.asarray(x, dtype)
        seen.setdefault(path, set()).add(layer)
        del tensor, x
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise ConversionError(f"{len(unexpected)} unexpected key(s) for format {fmt!r} with adapter "
                              f"{config.adapter!r}: {shown}")
    if strict:
        missing = []
        for _, path, kind, _ in rows:
            if kind == "tied":
                continue
            n = _layer_count(path, config)
            if n is None:
                if path not in seen:
                    missing.append(K.torch_key(path, None, fmt, config.adapter))
            else:
                for i in sorted(set(range(n)) - seen.get(path, set())):
                    missing.append(K.torch_key(path, i, fmt, config.adapter))
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ConversionError(f"{len(missing)} key(s) missing for format {fmt!r}: {shown}")
    return out


def export_state(flat: dict[str, np.ndarray], config, fmt: str, *,
                 dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, torch-layout array) for every parameter in `flat`, in format `fmt`."""
    rows = K.compile_table(fmt, config.adapter, config.text.tie_word_embeddings)
    by_path = {path: kind for _, path, kind, _ in rows}
    for path, arr in flat.items():
        if path not in by_path:
            continue
        kind = by_path[path]
        if kind == "tied":
            continue
        n = _layer_count(path, config)
        for layer in (range(n) if n is not None else [None]):
            x = arr[layer] if layer is not None else arr
            x = np.ascontiguousarray(untransform(np.asarray(x), kind))
            if dtype is not None:
                x = x.astype(dtype)
            yield K.torch_key(path, layer, fmt, config.adapter), x


def flat_to_nested(flat: dict[str, np.ndarray]) -> dict:
    """'a/b/c' -> nested dicts, the layout of nnx.State.to_pure_dict()."""
    out: dict = {}
    for path, arr in flat.items():
        node = out
        *head, last = path.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = arr
    return out


def nested_to_flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of flat_to_nested."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(nested_to_flat(v, p))
        else:
            out[p] = v
    return out


def load_into_model(model, flat: dict[str, np.ndarray]):
    """Write converted arrays into an nnx model in place (parts absent from `flat` are kept)."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    pure = state.to_pure_dict()
    have = nested_to_flat(pure)
    for path, arr in flat.items():
        if path not in have:
            raise ConversionError(f"parameter {path} does not exist in the model")
        if tuple(have[path].shape) != tuple(arr.shape):
            raise ConversionError(f"parameter {path}: converted shape {arr.shape} != model {have[path].shape}")
        have[path] = jnp.asarray(arr, jnp.float32)
    nnx.replace_by_pure_dict(state, flat_to_nested(have))
    nnx.update(model, state)
    return model
