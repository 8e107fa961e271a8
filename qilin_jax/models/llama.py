"""LLaMA-2 decoder in Flax NNX: RMSNorm, rotate-half RoPE, SwiGLU, MHA/GQA, KV cache.

Layers are stored stacked (leading `layers` axis) and run with `lax.scan`, so a 40-layer
model compiles one block. Kernels are [in, out] (torch Linear weights transposed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qilin_jax.models.attention import attention, make_mask, resolve_implementation
from qilin_jax.models.common import DTYPES, dense, dense_t, param, rms_norm, scan_layers, stacked_values
from qilin_jax.models.configs import TextConfig
from qilin_jax.models.lora import lora_delta
from qilin_jax.models.quant import dense_weight
from qilin_jax.sharding import constrain


class KVCache(NamedTuple):
    """Decoder KV cache: k/v [layers, batch, slots, kv_heads, head_dim], valid slots, next slot."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array  # [batch, slots] int32, 1 where the slot holds a real token
    index: jax.Array  # int32 scalar: the slot the next token is written to

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, slots), jnp.int32),
            jnp.zeros((), jnp.int32),
        )


def rope_inv_freq(cfg: TextConfig):
    """Inverse frequencies and the position scale for rotate-half RoPE."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scale = 1.0
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        if kind == "linear":
            scale = 1.0 / float(cfg.rope_scaling["factor"])
        elif kind not in (None, "default"):
            raise ValueError(f"text.rope_scaling type {kind!r} is not supported (use 'linear')")
    return inv, scale


def rope_cos_sin(positions, cfg: TextConfig):
    """cos/sin [batch, seq, head_dim] in float32 for integer positions [batch, seq]."""
    inv, scale = rope_inv_freq(cfg)
    freqs = (positions.astype(jnp.float32) * scale)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on [batch, seq, heads, head_dim]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class LlamaLayers(nnx.Module):
    """All decoder blocks, parameters stacked over a leading `layers` axis."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        L, D, M = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.attn_norm = param(rngs, (L, D), ("layers", "norm"), value=1.0)
        self.q_proj = param(rngs, (L, D, H * hd), ("layers", "embed", "heads"))
        self.k_proj = param(rngs, (L, D, KV * hd), ("layers", "embed", "kv_heads"))
        self.v_proj = param(rngs, (L, D, KV * hd), ("layers", "embed", "kv_heads"))
        self.o_proj = param(rngs, (L, H * hd, D), ("layers", "heads", "embed"))
        self.mlp_norm = param(rngs, (L, D), ("layers", "norm"), value=1.0)
        self.gate_proj = param(rngs, (L, D, M), ("layers", "embed", "mlp"))
        self.up_proj = param(rngs, (L, D, M), ("layers", "embed", "mlp"))
        self.down_proj = param(rngs, (L, M, D), ("layers", "mlp", "embed"))


# The decoder's matrices; `layer_list` keeps them transposed, [out, in], as `<name>_t`.
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _proj(x, p, name: str, dtype):
    """x times the layer's matrix `name`: stored [in, out] (the model) or [out, in] as
    `<name>_t` (`layer_list`'s decode copy) or quantized (`<name>_int8|_int4|_nf4`,
    models/quant.py); which one is known at trace time. A LoRA adapter on it
    (`<name>_lora_a/_b`, models/lora.py) is added."""
    if name in p:
        y = dense(x, p[name].astype(dtype))
    elif name + "_t" in p:
        y = dense_t(x, p[name + "_t"].astype(dtype))
    else:  # stored quantized (models/quant.py): dequantized here, one layer at a time
        y = dense(x, dense_weight(p, name, dtype))
    delta = lora_delta(x, p, name, dtype)  # None without a LoRA adapter on this matrix
    return y if delta is None else y + delta


def _qkv(p, x, cfg: TextConfig, cos, sin, dtype):
    """RMSNorm, then q [batch, seq, heads, hd] and k, v [batch, seq, kv_heads, hd], RoPE applied."""
    B, T, _ = x.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = _proj(h, p, "q_proj", dtype).reshape(B, T, H, hd)
    k = _proj(h, p, "k_proj", dtype).reshape(B, T, KV, hd)
    v = _proj(h, p, "v_proj", dtype).reshape(B, T, KV, hd)
    q = constrain(q, ("batch", "act_seq", "act_heads", None))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _out_mlp(p, x, out, cfg: TextConfig, dtype):
    """The residual after attention (output `out` [batch, seq, heads, hd]) and the SwiGLU MLP."""
    B, T, _ = x.shape
    out = constrain(out, ("batch", "act_seq", "act_heads", None))
    x = x + _proj(out.reshape(B, T, -1), p, "o_proj", dtype)
    x = constrain(x, ("batch", "act_seq", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = _proj(h, p, "gate_proj", dtype)
    up = _proj(h, p, "up_proj", dtype)
    act = constrain(jax.nn.silu(gate) * up, ("batch", "act_seq", "act_mlp"))
    x = x + _proj(act, p, "down_proj", dtype)
    return constrain(x, ("batch", "act_seq", "act_embed"))


def _block(
    p, x, *, cfg: TextConfig, cos, sin, mask, segment_ids, lengths, impl, dtype, cache_kv=None, cache_index=None
):
    """One decoder block on [batch, seq, embed]; returns (x, (k, v) for the cache or None).
    Profiles show it as `attention` (norm, q/k/v, RoPE, cache write, attention) and `mlp`
    (output projection and residual, norm, SwiGLU)."""
    with jax.named_scope("attention"):
        q, k, v = _qkv(p, x, cfg, cos, sin, dtype)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_kv = (ck, cv)
            k, v = ck.astype(dtype), cv.astype(dtype)
        # With a cache the mask carries causality (queries sit at cache.index onwards).
        out = attention(
            q, k, v, mask=mask, causal=cache_kv is None, segment_ids=segment_ids, lengths=lengths, implementation=impl
        )
    with jax.named_scope("mlp"):
        return _out_mlp(p, x, out, cfg, dtype), new_kv


def _prefix_block(p, xp, x, *, cfg: TextConfig, cos_p, sin_p, cos, sin, mask_p, mask, impl, dtype):
    """One decoder block on a shared prefix xp [1, P, embed] and the rows x [batch, T, embed]
    that continue it: the prefix attends causally to itself, each row to the whole prefix
    and causally to itself. The prefix's k/v are broadcast to the rows, so autodiff sums
    their gradients over the rows: exactly the block on the concatenated rows."""
    with jax.named_scope("attention"):
        qp, kp, vp = _qkv(p, xp, cfg, cos_p, sin_p, dtype)
        q, k, v = _qkv(p, x, cfg, cos, sin, dtype)
        out_p = attention(qp, kp, vp, mask=mask_p, causal=True, implementation=impl)
        B = x.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(kp, (B,) + kp.shape[1:]), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(vp, (B,) + vp.shape[1:]), v], axis=1)
        out = attention(q, k, v, mask=mask, causal=False, implementation=impl)
    with jax.named_scope("mlp"):
        return _out_mlp(p, xp, out_p, cfg, dtype), _out_mlp(p, x, out, cfg, dtype)


def layer_list(layers: LlamaLayers, transpose: bool = True) -> list[dict]:
    """The stacked decoder parameters as one dict of arrays per layer.

    CPU inference: inside a scan over stacked layers XLA:CPU copies each layer's weights out
    of the stacked array before its matmuls, every step, which triples the memory traffic of a
    (weight-bound) decode step. Sliced once per generate call and run in a Python loop
    (`LlamaModel.__call__(..., layers=)`), the matmuls read them in place: much faster
    decoding on CPU. The matrices are kept transposed, [out, in] under `<name>_t` (the torch
    Linear layout): XLA:CPU's matrix-vector products stream that layout faster (see
    docs/performance.md); `transpose=False` keeps the model's [in, out] (the baseline of
    bench/decode_layout.py). Accelerators keep the scan (a second copy of a 13B model's
    weights would not fit there).
    """
    stacked = stacked_values(layers)
    n = next(iter(stacked.values())).shape[0]
    t = MATRICES if transpose else ()
    return [{(k + "_t" if k in t else k): (v[i].T if k in t else v[i]) for k, v in stacked.items()} for i in range(n)]


class LlamaModel(nnx.Module):
    """Decoder-only LLaMA with an LM head; `__call__` returns (hidden_states, new_cache)."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: str = "float32",
        attention_impl: str = "auto",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.remat = remat
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = LlamaLayers(cfg, rngs=rngs)
        self.norm = param(rngs, (cfg.hidden_size,), ("norm",), value=1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def embed(self, input_ids):
        """Token embeddings [batch, seq, embed] in the compute dtype (ids clipped to the vocab)."""
        ids = jnp.clip(input_ids, 0, self.cfg.vocab_size - 1)
        emb = jnp.take(self.embed_tokens.get_value(), ids, axis=0).astype(DTYPES[self.dtype])
        return constrain(emb, ("batch", "act_seq", "act_embed"))

    def head_kernel(self):
        """The [embed, vocab] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.get_value().T
        return self.lm_head.get_value()

    def logits(self, hidden):
        """Logits [batch, seq, vocab] in the compute dtype."""
        out = dense(hidden, self.head_kernel().astype(hidden.dtype))
        return constrain(out, ("batch", "act_seq", "act_vocab"))

    def __call__(
        self,
        inputs_embeds,
        *,
        segment_ids=None,
        position_ids=None,
        cache: KVCache | None = None,
        packed: bool = False,
        layers: list[dict] | None = None,
        prefix_embeds=None,
    ):
        """Final-norm hidden states [batch, seq, embed] and the updated cache (or None): the
        training / scoring forward (`_forward`), its shared-prefix form (`_forward_prefix`) or
        the cached prefill / decode step (`_decode`).

        segment_ids: [batch, seq], 1.. for tokens of each packed sample, 0 for padding
        (an attention mask is segment ids with a single segment); `packed` (static) says rows
        may hold several segments, which rules out kernels that only know lengths. With a cache, the new
        tokens are written at cache.index and attend to every valid slot before them.
        layers (with a cache only): the decoder's parameters as one dict of arrays per layer
        (`layer_list`), run in a Python loop instead of the scan over the stacked arrays; the
        CPU inference path (see `layer_list`).
        prefix_embeds (training, no cache, not packed): [1, P, embed], a prefix that every row
        continues (e.g. BOS and the template's system prompt): it is computed once and each row
        attends to it, instead of once per row; the rows then sit at positions P.. (the
        default position_ids). Returns the rows' hidden states only. Equal to running the
        concatenated rows; the attention of the rows is the XLA one (the flash kernels know
        neither the shared keys nor their mask), so this pays off for short rows.
        """
        cfg = self.cfg
        dtype = DTYPES[self.dtype]
        x = inputs_embeds.astype(dtype)
        B, T, _ = x.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) + P
            if cache is not None:
                position_ids = position_ids + cache.index
        cos, sin = rope_cos_sin(position_ids, cfg)
        new_cache = None
        if prefix_embeds is not None:
            if cache is not None or packed:
                raise ValueError("prefix_embeds is for training on unpacked rows (no cache, not packed)")
            x = self._forward_prefix(prefix_embeds.astype(dtype), x, segment_ids, cos, sin)
        elif cache is None:
            x = self._forward(x, segment_ids, cos, sin, packed)
        else:
            x, new_cache = self._decode(x, segment_ids, cos, sin, cache, layers)
        x = rms_norm(x, self.norm.get_value(), cfg.rms_norm_eps)
        return x, new_cache

    def _forward(self, x, segment_ids, cos, sin, packed: bool):
        """Training / scoring: every position of x [batch, seq, embed], causal within each
        segment, through the scan over the stacked layers (no final norm)."""
        cfg, dtype = self.cfg, x.dtype
        impl = resolve_implementation(self.attention_impl, dtype, packed=packed, decoding=False)
        mask = make_mask(segment_ids, segment_ids, causal=True) if impl in ("xla", "xla_reference") else None
        lengths = jnp.sum(segment_ids != 0, axis=1) if impl == "cudnn" else None

        def body(h, p):
            h, _ = _block(
                p,
                h,
                cfg=cfg,
                cos=cos,
                sin=sin,
                mask=mask,
                segment_ids=segment_ids,
                lengths=lengths,
                impl=impl,
                dtype=dtype,
            )
            return h, None

        x, _ = scan_layers(body, x, stacked_values(self.layers), remat=self.remat)
        return x

    def _forward_prefix(self, xp, x, segment_ids, cos, sin):
        """Training with a shared prefix xp [1, P, embed] that every row of x [batch, T, embed]
        continues (see `__call__`): the rows' hidden states (no final norm)."""
        cfg, dtype = self.cfg, x.dtype
        B, T, _ = x.shape
        P = xp.shape[1]
        impl = resolve_implementation(self.attention_impl, dtype, packed=False, decoding=False)
        impl = impl if impl in ("xla", "xla_reference") else "xla"
        ones = jnp.ones((1, P), jnp.int32)
        cos_p, sin_p = rope_cos_sin(jnp.arange(P, dtype=jnp.int32)[None], cfg)
        mask_p = make_mask(ones, ones, causal=True)
        mask = jnp.concatenate(
            [jnp.ones((B, 1, T, P), bool), make_mask(segment_ids, segment_ids, causal=True)], axis=-1
        )

        def prefix_body(carry, p):
            hp, h = carry
            return _prefix_block(
                p,
                hp,
                h,
                cfg=cfg,
                cos_p=cos_p,
                sin_p=sin_p,
                cos=cos,
                sin=sin,
                mask_p=mask_p,
                mask=mask,
                impl=impl,
                dtype=dtype,
            ), None

        (_, x), _ = scan_layers(prefix_body, (xp, x), stacked_values(self.layers), remat=self.remat)
        return x

    def _decode(self, x, segment_ids, cos, sin, cache: KVCache, layers: list[dict] | None):
        """Prefill or decode step with a KV cache: x [batch, T, embed] is written at
        cache.index and attends to every valid slot before it. Returns (hidden states without
        the final norm, the updated cache)."""
        cfg, dtype = self.cfg, x.dtype
        B, T, _ = x.shape
        S = cache.k.shape[2]
        slots = jnp.arange(S, dtype=jnp.int32)
        q_slots = cache.index + jnp.arange(T, dtype=jnp.int32)
        written = (slots[None, :] >= cache.index) & (slots[None, :] < cache.index + T)
        new_mask = jnp.where(
            written,
            jax.lax.dynamic_update_slice(
                jnp.zeros((B, S), jnp.int32), (segment_ids != 0).astype(jnp.int32), (0, cache.index)
            ),
            cache.mask,
        )
        mask = make_mask(
            jnp.ones((B, T), jnp.int32),
            new_mask,
            causal=True,
            q_positions=jnp.broadcast_to(q_slots, (B, T)),
            kv_positions=jnp.broadcast_to(slots, (B, S)),
        )

        # The cache rides in the scan carry and each layer's slice is written back in
        # place: as scanned inputs/outputs the whole cache would be copied every step (a
        # second cache in temporaries; bench/tpu_compile.py's decode program).
        def cached_block(p, h, ck, cv):
            return _block(
                p,
                h,
                cfg=cfg,
                cos=cos,
                sin=sin,
                mask=mask,
                segment_ids=None,
                lengths=None,
                impl="xla",
                dtype=dtype,
                cache_kv=(ck, cv),
                cache_index=cache.index,
            )

        def body(carry, xs):
            h, ks, vs = carry
            p, i = xs
            h, (ck, cv) = cached_block(
                p,
                h,
                jax.lax.dynamic_index_in_dim(ks, i, keepdims=False),
                jax.lax.dynamic_index_in_dim(vs, i, keepdims=False),
            )
            ks = jax.lax.dynamic_update_index_in_dim(ks, ck, i, 0)
            vs = jax.lax.dynamic_update_index_in_dim(vs, cv, i, 0)
            return (h, ks, vs), None

        if layers is not None:
            ks, vs = [], []
            for i, p in enumerate(layers):
                x, (ck, cv) = cached_block(p, x, cache.k[i], cache.v[i])
                ks.append(ck)
                vs.append(cv)
            ks, vs = jnp.stack(ks), jnp.stack(vs)
        else:
            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, ks, vs), _ = scan_layers(body, (x, cache.k, cache.v), (stacked_values(self.layers), layer_ids))
        return x, KVCache(ks, vs, new_mask, cache.index + T)
