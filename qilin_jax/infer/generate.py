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

from qilin_jax.models.common import DTYPES
from qilin_jax.models.llama import KVCache


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
    out = model(ids, pixel_values, segment_ids=mask, position_ids=pos, cache=cache)
    return out.logits[:, -1], out.cache, pos[:, -1]


def _step(model, tok, cache, pos):
    out = model(tok[:, None], segment_ids=jnp.ones_like(tok)[:, None], position_ids=pos[:, None],
                cache=cache)
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "max_tokens", "sampling"))
def _generate_jit(graphdef, state, ids, mask, pixel_values, max_new, eos_id, pad_id, rng, *,
                  slots, max_tokens, sampling):
    model = nnx.merge(graphdef, state)
    B = ids.shape[0]
    logits, cache, pos = _prefill(model, ids, mask, pixel_values, slots)
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
        logits, cache = _step(model, tok, cache, pos)
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
                        sampling=SamplingConfig(do_sample, temperature, top_k, top_p))
    return np.asarray(out)[:, :max_new_tokens]


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill_jit(graphdef, state, ids, mask, pixel_values, *, slots):
    return _prefill(nnx.merge(graphdef, state), ids, mask, pixel_values, slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _stream_step_jit(graphdef, state, logits, cache, pos, rng, *, sampling):
    model = nnx.merge(graphdef, state)
    tok = sample_logits(logits, rng, sampling)
    pos = pos + 1
    logits, cache = _step(model, tok, cache, pos)
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
    done = np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok, logits, cache, pos = _stream_step_jit(graphdef, state, logits, cache, pos, sub,
                                                   sampling=sampling)
        tok = np.asarray(tok)
        yield tok
        done |= tok == eos
        if done.all():
            return
