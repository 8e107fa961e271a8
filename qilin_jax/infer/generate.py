"""Batched generation with a KV cache: greedy or sampled, compiled once per shape bucket.

Prompts of different lengths are left-aligned (left padding) into a prompt bucket; the
cache holds bucket + new-token-bucket slots. `generate` runs prefill and the whole decode
loop (a `lax.while_loop` that stops when every row has produced `</s>`) in one compiled
program per (batch, prompt bucket, new-token bucket, images) shape: the number of new tokens
is a runtime value, not a compile-time one. `stream` yields tokens one step at a time (chat).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qilin_jax.models.attention import make_mask
from qilin_jax.models.common import DTYPES, rms_norm, stacked_values
from qilin_jax.models.llama import KVCache, _block, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings: greedy when do_sample is False or temperature is 0."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def sample_logits(logits, rng, cfg: SamplingConfig):
    """Next tokens [batch] from logits [batch, vocab] under a SamplingConfig."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k > 0:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum - probs < cfg.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_align(input_ids, attention_mask, length: int, pad_id: int = 0):
    """Move each row's real tokens to the right end of a [batch, length] array."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    B = ids.shape[0]
    out_ids = np.full((B, length), pad_id, np.int32)
    out_mask = np.zeros((B, length), np.int32)
    for b in range(B):
        toks = ids[b][mask[b].astype(bool)]
        if len(toks) > length:
            raise ValueError(f"prompt {b} has {len(toks)} tokens, more than the bucket {length}")
        if len(toks):
            out_ids[b, length - len(toks):] = toks
            out_mask[b, length - len(toks):] = 1
    return out_ids, out_mask


def _prefill(model, ids, mask, pixel_values, slots: int):
    cfg = model.config
    B, T = ids.shape
    cache = KVCache.init(cfg.text, B, slots, DTYPES[cfg.dtype])
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    emb = model.embed_inputs(jnp.asarray(ids), pixel_values)
    hidden, cache = model.llm(emb, segment_ids=mask, position_ids=pos, cache=cache)
    # Only the last position's logits are used: [batch, 1, vocab], not [batch, T, vocab]
    # (the LM head over every prompt position was ~35% of a CPU prefill).
    return model.llm.logits(hidden[:, -1:])[:, 0], cache, pos[:, -1]


def _step(model, tok, cache, pos, layers=None):
    if layers is not None:
        return _step_unstacked(model, layers, tok, cache, pos)
    out = model(tok[:, None], segment_ids=jnp.ones_like(tok)[:, None], position_ids=pos[:, None],
                cache=cache)
    return out.logits[:, -1], out.cache


# Decoding on CPU: inside a scan over stacked layers XLA:CPU copies each layer's weights out
# of the stacked array before every matmul, which triples the memory traffic of a decode step
# (weight-bound). With the layers as separate arrays, sliced once per generate call and run
# in a Python loop, the matmuls read them in place: ~2.4x faster decoding on CPU. Accelerators
# keep the scan (a second copy of a 13B model's weights would not fit there). Same math as
# LlamaModel's cache path (test_generate compares cached and cache-free decoding).


def _unstack_decode(state) -> bool:
    """Whether decoding runs unstacked layers: when the parameters live on CPU."""
    leaf = jax.tree.leaves(state)[0]
    return all(d.platform == "cpu" for d in leaf.devices())


def _layer_list(model) -> list[dict]:
    """The decoder's stacked parameters as one dict of arrays per layer."""
    stacked = stacked_values(model.llm.layers)
    return [{k: v[i] for k, v in stacked.items()} for i in range(model.config.text.num_hidden_layers)]


def _step_unstacked(model, layers, tok, cache, pos):
    """One decode step (logits [batch, vocab], cache) with per-layer parameter arrays."""
    llm = model.llm
    cfg = llm.cfg
    B = tok.shape[0]
    x = llm.embed(tok[:, None])
    cos, sin = rope_cos_sin(pos[:, None], cfg)
    S = cache.k.shape[2]
    new_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((B, 1), jnp.int32), (0, cache.index))
    mask = make_mask(jnp.ones((B, 1), jnp.int32), new_mask, causal=True,
                     q_positions=jnp.broadcast_to(cache.index, (B, 1)),
                     kv_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    ks, vs = [], []
    for i, p in enumerate(layers):
        x, (ck, cv) = _block(p, x, cfg=cfg, cos=cos, sin=sin, mask=mask, segment_ids=None,
                             lengths=None, impl="xla", dtype=DTYPES[llm.dtype],
                             cache_kv=(cache.k[i], cache.v[i]), cache_index=cache.index)
        ks.append(ck)
        vs.append(cv)
    x = rms_norm(x, llm.norm.get_value(), cfg.rms_norm_eps)
    return llm.logits(x)[:, -1], KVCache(jnp.stack(ks), jnp.stack(vs), new_mask, cache.index + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "max_tokens", "sampling", "unstack"))
def _generate_jit(graphdef, state, ids, mask, pixel_values, max_new, eos_id, pad_id, rng, *,
                  slots, max_tokens, sampling, unstack=False):
    model = nnx.merge(graphdef, state)
    B = ids.shape[0]
    logits, cache, pos = _prefill(model, ids, mask, pixel_values, slots)
    layers = _layer_list(model) if unstack else None
    out = jnp.full((B, max_tokens), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)

    def cond(c):
        t, _, _, _, done, _, _ = c
        return (t < max_new) & ~jnp.all(done)

    def body(c):
        t, logits, cache, pos, done, out, rng = c
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits, sub, sampling)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, t].set(tok)
        done = done | (tok == eos_id)
        pos = pos + 1
        logits, cache = _step(model, tok, cache, pos, layers)
        return t + 1, logits, cache, pos, done, out, rng

    carry = (jnp.zeros((), jnp.int32), logits, cache, pos, done, out, rng)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5]


def _prepare(model, input_ids, attention_mask, max_new_tokens: int, prompt_bucket: int | None):
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    lengths = (np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)).sum(1)
    T = prompt_bucket or bucket(int(lengths.max()))
    ids, mask = left_align(ids, attention_mask, T, model.config.text.pad_token_id)
    slots = T + bucket(max_new_tokens)
    return ids, mask, slots


def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int = 0,
             prompt_bucket: int | None = None) -> np.ndarray:
    """New tokens [batch, max_new_tokens] (greedy by default), padded after `</s>`."""
    cfg = model.config
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.text.pad_token_id if pad_token_id is None else pad_token_id
    ids, mask, slots = _prepare(model, input_ids, attention_mask, max_new_tokens, prompt_bucket)
    graphdef, state = nnx.split(model)
    px = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    out = _generate_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), px,
                        jnp.int32(max_new_tokens), jnp.int32(eos), jnp.int32(pad),
                        jax.random.PRNGKey(seed), slots=slots, max_tokens=bucket(max_new_tokens),
                        sampling=SamplingConfig(do_sample, temperature, top_k, top_p),
                        unstack=_unstack_decode(state))
    return np.asarray(out)[:, :max_new_tokens]


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill_jit(graphdef, state, ids, mask, pixel_values, *, slots):
    return _prefill(nnx.merge(graphdef, state), ids, mask, pixel_values, slots)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_list_jit(graphdef, state):
    return _layer_list(nnx.merge(graphdef, state))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _stream_step_jit(graphdef, state, logits, cache, pos, rng, layers=None, *, sampling):
    model = nnx.merge(graphdef, state)
    tok = sample_logits(logits, rng, sampling)
    pos = pos + 1
    logits, cache = _step(model, tok, cache, pos, layers)
    return tok, logits, cache, pos


def stream(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 256,
           do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_token_id: int | None = None, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield the next token of every row ([batch] int array) step by step, until all hit `</s>`."""
    cfg = model.config
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    ids, mask, slots = _prepare(model, input_ids, attention_mask, max_new_tokens, None)
    graphdef, state = nnx.split(model)
    px = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    logits, cache, pos = _prefill_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), px, slots=slots)
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    rng = jax.random.PRNGKey(seed)
    layers = _layer_list_jit(graphdef, state) if _unstack_decode(state) else None
    done = np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok, logits, cache, pos = _stream_step_jit(graphdef, state, logits, cache, pos, sub, layers,
                                                   sampling=sampling)
        tok = np.asarray(tok)
        yield tok
        done |= tok == eos
        if done.all():
            return
