"""One attention function for every model and platform.

`attention(q, k, v, ...)` takes [batch, seq, heads, head_dim] arrays (GQA: fewer k/v heads)
and dispatches to an implementation:
  - "xla": plain XLA softmax attention with an explicit mask and a custom VJP (the
    flash-attention backward: only q, k, v, the output and the log-sum-exp are saved, and
    the softmax's row term comes from dO * O); "xla_reference" is
    `jax.nn.dot_product_attention(implementation="xla")`, kept for comparison;
  - "cudnn": the cuDNN flash kernel (GPU, bf16/fp16) with causal masking and per-row
    sequence lengths (right padding, no packing);
  - "splash": the Pallas splash-attention kernel on TPU, with segment ids (packing).
"auto" picks per platform and dtype, and falls back to "xla" where a kernel does not
support the masking the call needs.
"""

from __future__ import annotations

import functools

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


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay finite


def _scores(q, k, mask, scale):
    """Masked float32 scores [batch, kv_heads, group, q_len, kv_len] (q in grouped form)."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, _MASKED)
    return s


def _group(q, kv_heads):
    B, T, H, d = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, d)


def _group_mask(mask, kv_heads):
    """A [batch, 1|heads, q, kv] mask in the grouped [batch, kv_heads|1, group|1, q, kv] form."""
    if mask is None:
        return None
    B, Hm, T, S = mask.shape
    if Hm == 1:
        return mask[:, :, None]
    return mask.reshape(B, kv_heads, Hm // kv_heads, T, S)


def _block_ranges(T: int, block: int):
    """(q_start, q_end) of each query block; keys of block i are [0, q_end) (causal)."""
    if block <= 0 or block >= T:
        return [(0, T)]
    return [(a, min(a + block, T)) for a in range(0, T, block)]


def _fwd_piece(qg, k, v, gmask, scale):
    s = _scores(qg, k, gmask, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bskd->btkgd", (p / denom).astype(v.dtype), v, preferred_element_type=jnp.float32)
    # Row max and log-sum are kept apart: for a fully masked row, m is -0.7 * f32 max and
    # m + log(denom) would round back to m.
    return o, m[..., 0], jnp.log(denom)[..., 0]


def _cat(xs, axis):
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis)


def _slice_mask(gmask, a, b, kv_end):
    return None if gmask is None else gmask[..., a:b, :kv_end]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, mask, block):
    return _softmax_attention_fwd(q, k, v, mask, block)[0]


def _softmax_attention_fwd(q, k, v, mask, block):
    B, T, H, d = q.shape
    KV = k.shape[2]
    scale = 1.0 / float(d) ** 0.5
    qg, gmask = _group(q, KV), _group_mask(mask, KV)
    outs, ms, lds = [], [], []
    for a, b in _block_ranges(T, block):
        end = b if block else k.shape[1]  # causal blocks: keys after the block's last query are masked
        o, m, ld = _fwd_piece(qg[:, a:b], k[:, :end], v[:, :end], _slice_mask(gmask, a, b, end), scale)
        outs.append(o), ms.append(m), lds.append(ld)
    out = _cat(outs, 1).reshape(B, T, H, d).astype(q.dtype)
    return out, (q, k, v, mask, out, (_cat(ms, -1), _cat(lds, -1)))


def _softmax_attention_bwd(block, res, dout):
    # The flash-attention backward: probabilities recomputed from the saved row statistics,
    # and the softmax's row term D = rowsum(dO * O) taken from [T, d] tensors, not [T, T].
    q, k, v, mask, out, (m, log_denom) = res
    B, T, H, d = q.shape
    S, KV = k.shape[1], k.shape[2]
    scale = 1.0 / float(d) ** 0.5
    qg, gmask = _group(q, KV), _group_mask(mask, KV)
    do = _group(dout, KV)
    D = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), _group(out, KV).astype(jnp.float32))
    dqs = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for a, b in _block_ranges(T, block):
        end = b if block else S
        mk = _slice_mask(gmask, a, b, end)
        p = jnp.exp((_scores(qg[:, a:b], k[:, :end], mk, scale) - m[..., a:b, None]) - log_denom[..., a:b, None])
        dob = do[:, a:b]
        dv_i = jnp.einsum("bkgts,btkgd->bskd", p.astype(v.dtype), dob, preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgd,bskd->bkgts", dob, v[:, :end], preferred_element_type=jnp.float32)
        ds = p * (dp - D[..., a:b, None]) * scale
        if mk is not None:  # masked scores are constants (a fully masked row has p > 0 there)
            ds = jnp.where(mk, ds, 0.0)
        ds = ds.astype(q.dtype)
        dqs.append(jnp.einsum("bkgts,bskd->btkgd", ds, k[:, :end], preferred_element_type=jnp.float32))
        dk_i = jnp.einsum("bkgts,btkgd->bskd", ds, qg[:, a:b], preferred_element_type=jnp.float32)
        if end == S:
            dk, dv = dk + dk_i, dv + dv_i
        else:
            dk, dv = dk.at[:, :end].add(dk_i), dv.at[:, :end].add(dv_i)
    dq = _cat(dqs, 1).reshape(B, T, H, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)

# Query-block size of the causal XLA attention: blocks of queries see only the keys up to
# their last position, so ~half of the [T, T] score work is skipped (0: one block).
CAUSAL_BLOCK = 128


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


def attention(q, k, v, *, mask=None, causal: bool = False, segment_ids=None, lengths=None, implementation: str = "xla"):
    """Scaled dot-product attention; returns [batch, q_len, heads, head_dim].

    mask: optional bool [batch, 1|heads, q_len, kv_len] (used by "xla").
    segment_ids: [batch, seq] packed-sample ids, 0 = padding (used by "splash").
    causal: the mask (if any) is causal with queries and keys at the same positions; "xla"
    then skips the keys past each query block. A query row that sees no key at all
    (padding) gets an unspecified finite output: nothing attends to it and it has no label.
    lengths: [batch] valid lengths for right-padded rows (used by "cudnn").
    """
    if implementation == "xla":
        # Causal self-attention (q and k the same positions) skips the keys past each query block.
        block = CAUSAL_BLOCK if (causal and q.shape[1] == k.shape[1]) else 0
        return _softmax_attention(q, k, v, mask, block)
    if implementation == "xla_reference":
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
