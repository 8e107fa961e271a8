"""TPU attention: the Pallas splash-attention kernel behind `attention(..., implementation="splash")`.

Causal (or full) masking AND-ed with segment ids, so packed rows never attend across
samples; GQA by running the multi-query kernel once per KV head over its group of query
heads (HF `repeat_kv` order: KV head j serves query heads j*G .. j*G+G-1). The kernel works on
one unbatched [heads, seq, head_dim] problem; batch (and KV heads) are vmapped.

Pallas calls are not partitioned by XLA's SPMD partitioner (it would gather every input onto
every chip), so inside an `activation_sharding(mesh)` context the kernel runs under
`shard_map`: batch over the mesh axes the "batch" rule names, heads over "act_heads" (when
they divide), each chip attending over its own rows and heads.

The sequence is padded to a multiple of the block size (segment id 0 for the padding, which
real tokens never attend to) and the padding sliced off again. `interpret=True` runs the
kernel in the Pallas interpreter, which is how the CPU tests check it against "xla".
Do not trace it for TPU under `jax_default_matmul_precision="highest"` with bf16 inputs:
Mosaic rejects the kernel's bf16 dots at that precision ("Bad lhs type").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qilin_jax import sharding as S

_BLOCKS = (512, 256, 128)


def _block_for(T: int) -> int:
    """The largest supported block dividing the (padded) sequence length."""
    for b in _BLOCKS:
        if T % b == 0:
            return b
    raise ValueError(f"splash attention: sequence length {T} is not a multiple of 128")


def _kernel(heads: int, T: int, *, causal: bool, mqa: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = _block_for(T)
    blocks = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    one = sa.CausalMask((T, T)) if causal else sa.FullMask((T, T))
    mask = sa.MultiHeadMask([one] * heads)
    make = sa.make_splash_mqa if mqa else sa.make_splash_mha
    return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, seg, *, causal: bool, interpret: bool):
    """Splash attention on local arrays: q [B,T,H,hd], k/v [B,T,KV,hd], seg [B,T] -> [B,T,H,hd]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, hd = q.shape
    KV = k.shape[2]
    q = q * jnp.asarray(hd**-0.5, q.dtype)  # the kernel does not scale
    q = q.transpose(0, 2, 1, 3)  # [B, H, T, hd]
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    ids = lambda s: SegmentIds(q=s, kv=s)
    if KV == H:
        kern = _kernel(H, T, causal=causal, mqa=False, interpret=interpret)
        out = jax.vmap(lambda q_, k_, v_, s_: kern(q_, k_, v_, segment_ids=ids(s_)))(q, k, v, seg)
    else:
        G = H // KV
        kern = _kernel(G, T, causal=causal, mqa=True, interpret=interpret)
        qg = q.reshape(B, KV, G, T, hd)
        per_kv = jax.vmap(lambda q_, k_, v_, s_: kern(q_, k_, v_, segment_ids=ids(s_)), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_kv)(qg, k, v, seg).reshape(B, H, T, hd)
    return out.transpose(0, 2, 1, 3)


def _axes_that_divide(spec_entry, size: int, mesh) -> tuple[str, ...] | None:
    if spec_entry is None:
        return None
    names = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
    keep, n = [], 1
    for a in names:
        if size % (n * mesh.shape[a]) == 0:
            keep.append(a)
            n *= mesh.shape[a]
    return tuple(keep) or None


def splash_attention(q, k, v, *, segment_ids=None, causal: bool = True, interpret: bool = False):
    """Attention [batch, seq, heads, head_dim] by the splash kernel (segment ids: 0 = padding)."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    Tp = -(-T // 128) * 128
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, Tp - T)))
    fn = functools.partial(_local, causal=causal, interpret=interpret)

    ctx = S._CTX.get()
    if ctx is not None and int(np.prod(list(ctx[0].shape.values()))) > 1:
        mesh, rules = ctx
        batch = _axes_that_divide(S.logical_to_spec(("batch",), rules, mesh)[0], B, mesh)
        head_entry = S.logical_to_spec(("act_heads",), rules, mesh)[0]
        heads = _axes_that_divide(head_entry, H, mesh)
        if heads is not None and _axes_that_divide(head_entry, KV, mesh) != heads:
            heads = None  # KV heads must split the same way as query heads
        qkv_spec = P(batch, None, heads, None)
        fn = jax.shard_map(
            fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)), out_specs=qkv_spec, check_vma=False
        )
    out = fn(q, k, v, segment_ids)
    return out[:, :T] if Tp != T else out
