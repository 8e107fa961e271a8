"""One attention function for every model and platform.

`attention(q, k, v, ...)` takes [batch, seq, heads, head_dim] arrays (GQA: fewer k/v heads)
and dispatches to an implementation:
  - "xla": `jax.nn.dot_product_attention(implementation="xla")` with an explicit mask;
  - "cudnn": the cuDNN flash kernel (GPU, bf16/fp16) with causal masking and per-row
    sequence lengths (right padding, no packing);
  - "splash": the Pallas splash-attention kernel on TPU, with segment ids (packing).
"auto" picks per platform and dtype, and falls back to "xla" where a kernel does not
support the masking the call needs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def make_mask(q_segment_ids, kv_segment_ids, *, causal: bool, q_positions=None, kv_positions=None):
    """Boolean mask [batch, 1, q_len, kv_len]: same segment, key not padding, and causal."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        if q_positions is None:
            q_positions = jnp.arange(q_segment_ids.shape[1])[None]
        if kv_positions is None:
            kv_positions = jnp.arange(kv_segment_ids.shape[1])[None]
        mask &= q_positions[:, :, None] >= kv_positions[:, None, :]
    return mask[:, None]


def _platform() -> str:
    return jax.devices()[0].platform


def resolve_implementation(impl: str, dtype, *, packed: bool, decoding: bool) -> str:
    """The implementation 'auto' resolves to for this platform, dtype and masking."""
    if impl != "auto":
        return impl
    plat = _platform()
    if decoding:
        return "xla"
    if plat == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not packed:
        return "cudnn"
    if plat == "tpu":
        return "splash"
    return "xla"


def attention(q, k, v, *, mask=None, causal: bool = False, segment_ids=None, lengths=None,
              implementation: str = "xla"):
    """Scaled dot-product attention; returns [batch, q_len, heads, head_dim].

    mask: optional bool [batch, 1|heads, q_len, kv_len] (used by "xla").
    segment_ids: [batch, seq] packed-sample ids, 0 = padding (used by "splash").
    lengths: [batch] valid lengths for right-padded rows (used by "cudnn").
    """
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if implementation == "cudnn":
        kw = {}
        if lengths is not None:
            kw = dict(query_seq_lengths=lengths.astype(jnp.int32), key_value_seq_lengths=lengths.astype(jnp.int32))
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn", **kw)
    if implementation == "splash":
        from qilin_jax.models import splash
        return splash.splash_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    raise ValueError(f"unknown attention implementation {implementation!r}")
