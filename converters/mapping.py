"""Map a PyTorch state dict (any format of keys.py) onto the qilin-jax parameter tree, and back.

Tensors arrive one at a time (see readers), so a stacked parameter is filled layer by
layer into a preallocated numpy buffer: memory stays near the size of the model's
parameters on the host, never two copies.
"""

from __future__ import annotations

from collections.abc import Iterable

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
        return (
            f" The checkpoint's vocab is {vocab} but the config "
            f"says text.vocab_size={config.text.vocab_size}: 32000 is LLaMA-2/FlagAlpha (the "
            "release), 55296 ymcui Chinese-LLaMA-2, 32064 HF llava (padded); choose the "
            "matching model preset or set model.text.vocab_size."
        )
    return ""


def transformed_shape(shape, kind: str) -> tuple[int, ...]:
    """The shape a torch tensor has after `transform(kind)` (no data needed)."""
    shape = tuple(shape)
    if kind == "T":
        return shape[::-1]
    if kind == "conv":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
    return shape


def _shown(keys, n=8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class _Checker:
    """Matches keys to parameters and checks shapes; collects unexpected and seen keys."""

    def __init__(self, config, fmt, parts, skip_other_parts):
        self.config, self.fmt = config, fmt
        self.parts = set(parts) if parts is not None else None
        self.skip_other_parts = skip_other_parts
        self.rows = K.compile_table(
            fmt, config.adapter, config.text.tie_word_embeddings, None if skip_other_parts else self.parts
        )
        self.shapes = expected_shapes(config)
        self.seen: dict[str, set] = {}
        self.unexpected: list[str] = []
        self.skipped: list[str] = []

    def _wanted(self, part) -> bool:
        if self.parts is None:
            return True
        return part in self.parts or (part == "lm_head" and "llm" in self.parts)

    def check(self, key, shape):
        """(path, layer, kind) for a key whose tensor goes into the model, else None."""
        if K.is_ignored(key):
            return None
        m = K.match(key, self.rows)
        if m is None:
            self.unexpected.append(key)
            return None
        path, layer, kind, part = m
        if not self._wanted(part):
            self.skipped.append(key)
            return None
        if kind == "tied":
            return None
        if path not in self.shapes:
            raise ConversionError(
                f"{key}: the config has no parameter {path} (adapter="
                f"{self.config.adapter!r}, tie_word_embeddings="
                f"{self.config.text.tie_word_embeddings})"
            )
        want = self.shapes[path]
        got = transformed_shape(shape, kind)
        if layer is not None:
            n = want[0]
            if layer >= n:
                raise ConversionError(
                    f"{key}: layer {layer} but the config has {n} layers (model.{path.split('/')[0]}.num_hidden_layers)"
                )
            if got != want[1:]:
                raise ConversionError(
                    f"{key}: shape {tuple(shape)} does not fit parameter {path} "
                    f"(expects per-layer {want[1:]} after transform {kind!r})"
                )
        elif got != want:
            raise ConversionError(
                f"{key}: shape {tuple(shape)} does not fit parameter {path} "
                f"(expects {want} after transform {kind!r})." + _vocab_hint(key, got, want, self.config)
            )
        if layer in self.seen.get(path, ()):
            raise ConversionError(f"{key}: parameter {path} (layer {layer}) is given twice")
        self.seen.setdefault(path, set()).add(layer)
        return path, layer, kind

    def finish(self, strict: bool):
        """Raise for unexpected keys, and for missing ones when strict."""
        if self.unexpected:
            raise ConversionError(
                f"{len(self.unexpected)} unexpected key(s) for format {self.fmt!r} with adapter "
                f"{self.config.adapter!r}: {_shown(self.unexpected)}"
            )
        if not strict:
            return
        missing = []
        for _, path, kind, part in self.rows:
            if kind == "tied" or not self._wanted(part):
                continue
            n = _layer_count(path, self.config)
            if n is None:
                if path not in self.seen:
                    missing.append(K.torch_key(path, None, self.fmt, self.config.adapter))
            else:
                for i in sorted(set(range(n)) - self.seen.get(path, set())):
                    missing.append(K.torch_key(path, i, self.fmt, self.config.adapter))
        if missing:
            raise ConversionError(f"{len(missing)} key(s) missing for format {self.fmt!r}: {_shown(missing)}")


def plan_state(
    items: Iterable[tuple[str, tuple]],
    config,
    fmt: str,
    *,
    parts: Iterable[str] | None = None,
    strict: bool = True,
    skip_other_parts: bool = False,
):
    """Check (key, shape) pairs against a config without reading data.

    Returns ([(key, path, layer, transform)] for every tensor that goes into the model, the
    keys skipped because they belong to parts not asked for). Raises ConversionError naming
    the keys for unexpected keys, missing keys (strict), shape and layer-count mismatches.
    """
    chk = _Checker(config, fmt, parts, skip_other_parts)
    plan = []
    for key, shape in items:
        r = chk.check(key, shape)
        if r is not None:
            plan.append((key,) + r)
    chk.finish(strict)
    return plan, chk.skipped


def convert_state(
    tensors: Iterable[tuple[str, np.ndarray]],
    config,
    fmt: str,
    *,
    parts: Iterable[str] | None = None,
    dtype=np.float32,
    strict: bool = True,
    skip_other_parts: bool = False,
) -> dict[str, np.ndarray]:
    """Flat 'part/name' -> array for the parts a checkpoint holds, from (key, tensor) pairs.

    Unknown keys and shape mismatches raise ConversionError naming the key; keys missing for
    the requested parts raise too (strict). Known buffers are skipped.
    """
    chk = _Checker(config, fmt, parts, skip_other_parts)
    out: dict[str, np.ndarray] = {}
    for key, tensor in tensors:
        r = chk.check(key, np.shape(tensor))
        if r is None:
            continue
        path, layer, kind = r
        x = transform(np.asarray(tensor), kind)
        if layer is not None:
            if path not in out:
                out[path] = np.zeros(chk.shapes[path], dtype)
            out[path][layer] = x
        else:
            # A copy: the source may be a memory map or a live torch tensor's memory, and jax
            # may alias host memory on CPU.
            out[path] = np.array(x, dtype, copy=True)
        del tensor, x
    chk.finish(strict)
    return out


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
