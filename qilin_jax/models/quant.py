"""Weight-only quantization of the LLM's decoder matrices: int8, int4 and NF4, dequantized on the
fly inside `llama._proj` (the matmul itself runs in the compute dtype).

Kinds (a matrix W [in, out] of one layer; stacked over layers like every decoder parameter):
- int8: per output channel, symmetric: scale[o] = max|W[:, o]| / 127, q = round(W / scale)
  in [-127, 127], stored int8 [in, out] and scale [1, out].
- int4: symmetric with a scale per group of G input rows and output column (G = 128, or 64
  when `in` is not a multiple of 128): scale[g, o] = max|W[g*G:(g+1)*G, o]| / 7, q in
  [-7, 7], two per byte (input rows 2i and 2i+1 in the low and high nibble): uint8
  [in/2, out] and scale [in/G, out].
- nf4: QLoRA's NormalFloat4: blocks of BLOCK (64) consecutive input rows per output column
  (the contiguous runs of a torch [out, in] weight, as bitsandbytes blocks them) scaled by
  their absmax to [-1, 1] and rounded to the nearest of the 16 NF4 levels; indices two per
  byte like int4, scale (the absmax) [in/64, out]. The scales are kept in float32 (QLoRA's
  double quantization of the scales, 0.37 bit per weight, is not done).

Stored as `<name>_int8|_int4|_nf4` + `<name>_qscale` parameters of `llm/layers` (what
`save_pretrained` writes and `load_pretrained` restores as is: a quantized checkpoint never
exists in float on the device). Frozen by construction: LoRA over a quantized base is QLoRA.
Written here rather than with qwix: see docs/finetuning.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("int8", "int4", "nf4")
GROUP = 128  # int4 group size (input rows per scale)
BLOCK = 64  # NF4 block size (QLoRA)
SCALE = "_qscale"
# QLoRA's NF4 levels (bitsandbytes' NF4 code table), ascending.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230611801147,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _group(kind: str, d_in: int) -> int:
    """Input rows per scale: NF4 blocks of 64; int4 groups of 128, or 64 when `d_in` is not a
    multiple of 128 (e.g. the demo model's 704-wide MLP)."""
    if kind == "nf4":
        return BLOCK
    return GROUP if d_in % GROUP == 0 else BLOCK


def check_shape(kind: str, d_in: int) -> None:
    """Raise a ValueError when a matrix with `d_in` input rows cannot be quantized as `kind`."""
    if kind not in KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if kind != "int8" and d_in % _group(kind, d_in):
        raise ValueError(f"quantize {kind}: input size {d_in} is not a multiple of the group size {_group(kind, d_in)}")


def _pack(q):
    """uint8 [..., in/2, out] from 4-bit codes 0..15 [..., in, out] (row 2i low, 2i+1 high)."""
    q = q.astype(jnp.uint8)
    return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def _unpack(packed):
    """4-bit codes 0..15 [..., in, out] (uint8) from `_pack`'s bytes."""
    lo, hi = packed & 0x0F, packed >> 4
    return jnp.stack([lo, hi], axis=-2).reshape(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))


def quantize(w, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of matrices w [..., in, out] (see the module docstring for the layouts)."""
    check_shape(kind, w.shape[-2])
    w = w.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        safe = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8), scale
    *lead, d_in, d_out = w.shape
    g = _group(kind, d_in)
    blocks = w.reshape(*lead, d_in // g, g, d_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    if kind == "int4":
        scale = absmax / 7.0
        codes = jnp.clip(jnp.round(blocks / jnp.where(scale > 0, scale, 1.0)), -7, 7) + 8  # 1..15
    else:
        scale = absmax
        x = blocks / safe
        levels = jnp.asarray(NF4_LEVELS)
        mids = (levels[1:] + levels[:-1]) / 2  # nearest level = number of midpoints below x
        codes = jnp.sum(x[..., None] > mids, axis=-1)
    return _pack(codes.reshape(*lead, d_in, d_out)), scale[..., 0, :]


def dequantize(codes, scale, kind: str, dtype=jnp.float32):
    """The matrices [..., in, out] in `dtype` from `quantize`'s (codes, scales)."""
    if kind == "int8":
        return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    q = _unpack(codes)
    if kind == "int4":
        vals = q.astype(jnp.float32) - 8.0
    else:
        vals = jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)]
    *lead, d_in, d_out = vals.shape
    g = d_in // scale.shape[-2]  # the group size the scales were made with
    vals = vals.reshape(*lead, d_in // g, g, d_out) * scale.astype(jnp.float32)[..., None, :]
    return vals.reshape(*lead, d_in, d_out).astype(dtype)


def stored_kind(p: dict, name: str) -> str | None:
    """The kind matrix `name` is stored as in a layer dict, or None (not quantized)."""
    return next((k for k in KINDS if f"{name}_{k}" in p), None)


def dense_weight(p: dict, name: str, dtype):
    """The dequantized [in, out] matrix `name` of one layer's dict (`llama._proj`)."""
    kind = stored_kind(p, name)
    if kind is None:
        raise KeyError(f"layer parameters have no matrix {name!r} (plain, transposed or quantized)")
    return dequantize(p[f"{name}_{kind}"], p[name + SCALE], kind, dtype)


def quantize_model(model, kind: str, targets=TARGETS):
    """`model` (a QilinMedVL) with the LLM's decoder matrices replaced by their quantized form,
    in place; returns it. LoRA adapters stay in float (QLoRA)."""
    layers = model.llm.layers
    for t in targets:
        base = getattr(layers, t, None)
        if base is None:
            continue
        w = base.get_value()
        check_shape(kind, w.shape[-2])
        ax = tuple(base.get_metadata().get("axes") or (None, None, None))
        codes, scale = jax.jit(quantize, static_argnums=1)(w, kind)
        delattr(layers, t)
        setattr(layers, f"{t}_{kind}", nnx.Param(codes, axes=ax))
        setattr(layers, t + SCALE, nnx.Param(scale, axes=(ax[0], None, ax[2])))
    return model


def attach_like(model, layer_shapes: dict):
    """`model` with the quantized layout found in `layer_shapes` (llm/layers name -> shape, e.g.
    a checkpoint's metadata), as zero placeholders to be restored into; returns it."""
    layers = model.llm.layers
    for t in TARGETS:
        kind = next((k for k in KINDS if f"{t}_{k}" in layer_shapes), None)
        if kind is None:
            continue
        base = getattr(layers, t)
        ax = tuple(base.get_metadata().get("axes") or (None, None, None))
        cshape = tuple(getattr(layer_shapes[f"{t}_{kind}"], "shape", layer_shapes[f"{t}_{kind}"]))
        sshape = tuple(getattr(layer_shapes[t + SCALE], "shape", layer_shapes[t + SCALE]))
        delattr(layers, t)
        dt = jnp.int8 if kind == "int8" else jnp.uint8
        setattr(layers, f"{t}_{kind}", nnx.Param(jnp.zeros(cshape, dt), axes=ax))
        setattr(layers, t + SCALE, nnx.Param(jnp.zeros(sshape, jnp.float32), axes=(ax[0], None, ax[2])))
    return model


def model_kind(model) -> str | None:
    """The quantization kind of a model's LLM matrices, or None (float)."""
    return params_kind(vars(model.llm.layers))


def quantize_params(params: dict, kind: str, targets=TARGETS) -> dict:
    """The pure-dict parameter tree with the LLM's decoder matrices quantized (`quantize_model`
    on a tree; jit it with output shardings to quantize in place on a mesh)."""
    layers = dict(params["llm"]["layers"])
    for t in targets:
        if t in layers:
            codes, scale = quantize(layers.pop(t), kind)
            layers[f"{t}_{kind}"], layers[t + SCALE] = codes, scale
    return {**params, "llm": {**params["llm"], "layers": layers}}


def params_kind(layer_params: dict) -> str | None:
    """The quantization kind of a `llm/layers` dict (names -> anything), or None."""
    return next((k for k in KINDS if any(f"{t}_{k}" in layer_params for t in TARGETS)), None)
