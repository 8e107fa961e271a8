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
import weakref
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qilin_jax.models.common import DTYPES, stacked_values
from qilin_jax.models.llama import KVCache, layer_list


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


def prompt_length_bucket(n: int, minimum: int = 16) -> int:
    """The prompt length a prompt of n tokens is padded to: powers of two up to 64, then four
    steps per doubling (64, 80, 96, 112, 128, 160, ..., 768, 896, 1024, ...), so padding
    wastes at most 25% of a prefill (a plain power of two wastes up to 50%) for at most
    four programs per doubling."""
    b = bucket(n, minimum)
    if b <= 64:
        return b
    step = b // 8  # b/2 < n <= b: try b/2 + k * b/8
    return min(b, -(-n // step) * step)


# Unstacking the layers (`llama.layer_list`) copies the decoder weights once per call; a CPU
# decode step with stacked layers reads them much slower. On bench/generate.py's medium
# model the copy costs about as much as what 2 decode steps save, so calls that decode
# fewer tokens keep the scan.
UNSTACK_MIN_NEW_TOKENS = 3
# Unless the model is small enough to keep its unstacked layers: CPU inference holds one
# unstacked copy of the decoder weights per model (a second copy in memory) when they take at
# most this many bytes, made on the first call and reused while the parameters stay the same
# arrays; every call then reads the layers in place, prefill included, with no copy.
LAYER_CACHE_MAX_BYTES = 4 << 30
_LAYER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
            out_ids[b, length - len(toks) :] = toks
            out_mask[b, length - len(toks) :] = 1
    return out_ids, out_mask


def _prefill(model, ids, mask, pixel_values, slots: int, layers=None):
    cfg = model.config
    B, T = ids.shape
    cache = KVCache.init(cfg.text, B, slots, DTYPES[cfg.dtype])
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    emb = model.embed_inputs(jnp.asarray(ids), pixel_values)
    hidden, cache = model.llm(emb, segment_ids=mask, position_ids=pos, cache=cache, layers=layers)
    # Only the last position's logits are used: [batch, 1, vocab], not [batch, T, vocab]
    # (the LM head over every prompt position is a large share of a CPU prefill).
    return model.llm.logits(hidden[:, -1:])[:, 0], cache, pos[:, -1]


def _step(model, tok, cache, pos, layers=None):
    """One decode step: (logits [batch, vocab], cache); `layers` as in LlamaModel.__call__."""
    hidden, cache = model.llm(
        model.llm.embed(tok[:, None]),
        segment_ids=jnp.ones_like(tok)[:, None],
        position_ids=pos[:, None],
        cache=cache,
        layers=layers,
    )
    return model.llm.logits(hidden)[:, -1], cache


def _on_cpu(state) -> bool:
    """Whether the parameters live on CPU (where decoding runs unstacked layers)."""
    leaf = jax.tree.leaves(state)[0]
    return all(d.platform == "cpu" for d in leaf.devices())


def decode_layers(model, graphdef, state, max_new_tokens: int | None) -> tuple[list[dict] | None, bool]:
    """The decode layout switch: (unstacked decoder layers to pass in, or None; whether the
    compiled generate call should unstack them itself).

    Accelerators: (None, False), the scan over the stacked layers. CPU (`llama.layer_list`):
    the per-model copy of `cached_layers` when the layers fit LAYER_CACHE_MAX_BYTES; else,
    for one compiled call that decodes `max_new_tokens` (generate), unstacking inside it when
    that pays off (>= UNSTACK_MIN_NEW_TOKENS); for step-by-step calls (stream:
    `max_new_tokens` None), one copy made now."""
    if not _on_cpu(state):
        return None, False
    layers = cached_layers(model, graphdef, state)
    if layers is not None:
        return layers, False
    if max_new_tokens is None:
        return _layer_list_jit(graphdef, state), False
    return None, max_new_tokens >= UNSTACK_MIN_NEW_TOKENS


def cached_layers(model, graphdef, state) -> list[dict] | None:
    """The model's unstacked decoder layers for CPU inference from the per-model cache (made
    now if missing or stale), or None: not on CPU, or over LAYER_CACHE_MAX_BYTES."""
    if not _on_cpu(state):
        return None
    stacked = tuple(jax.tree.leaves(stacked_values(model.llm.layers)))
    if sum(x.nbytes for x in stacked) > LAYER_CACHE_MAX_BYTES:
        return None
    hit = _LAYER_CACHE.get(model)
    # The entry holds the stacked arrays it was made from: identity means same values, and
    # no id can be reused while the entry lives.
    if hit is None or len(hit[0]) != len(stacked) or any(a is not b for a, b in zip(hit[0], stacked)):
        hit = (stacked, _layer_list_jit(graphdef, state))
        _LAYER_CACHE[model] = hit
    return hit[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "max_tokens", "sampling", "unstack"))
def _generate_jit(
    graphdef,
    state,
    ids,
    mask,
    pixel_values,
    max_new,
    eos_id,
    pad_id,
    rng,
    layers=None,
    *,
    slots,
    max_tokens,
    sampling,
    unstack=False,
):
    model = nnx.merge(graphdef, state)
    B = ids.shape[0]
    if layers is None and unstack:
        layers = layer_list(model.llm.layers)
    logits, cache, pos = _prefill(model, ids, mask, pixel_values, slots, layers)
    out = jnp.full((B, max_tokens), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)

    def emit(t, logits, done, out, rng):
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample_logits(logits, sub, sampling))
        return tok, done | (tok == eos_id), out.at[:, t].set(tok), rng

    # Token t comes from the logits of step t - 1; the loop stops one step early and the last
    # token is sampled after it, so no decode step runs whose logits nobody reads (one step of
    # N saved; a 1-token call is the prefill alone).
    def cond(c):
        t, _, _, _, done, _, _ = c
        return (t < max_new - 1) & ~jnp.all(done)

    def body(c):
        t, logits, cache, pos, done, out, rng = c
        tok, done, out, rng = emit(t, logits, done, out, rng)
        pos = pos + 1
        logits, cache = _step(model, tok, cache, pos, layers)
        return t + 1, logits, cache, pos, done, out, rng

    carry = (jnp.zeros((), jnp.int32), logits, cache, pos, done, out, rng)
    t, logits, _, _, done, out, rng = jax.lax.while_loop(cond, body, carry)
    # max_new >= 1 here (generate checks); after an early stop on `</s>` every row is done and
    # the last write is padding.
    return emit(t, logits, done, out, rng)[2]


def _prepare(model, input_ids, attention_mask, max_new_tokens: int, prompt_len: int | None):
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    lengths = (np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)).sum(1)
    T = prompt_len or prompt_length_bucket(int(lengths.max()))
    ids, mask = left_align(ids, attention_mask, T, model.config.text.pad_token_id)
    slots = T + bucket(max_new_tokens)
    return ids, mask, slots


def generate(
    model,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    prompt_bucket: int | None = None,
) -> np.ndarray:
    """New tokens [batch, max_new_tokens] (greedy by default), padded after `</s>`."""
    cfg = model.config
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.text.pad_token_id if pad_token_id is None else pad_token_id
    if max_new_tokens < 1:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        return np.zeros((np.asarray(input_ids).shape[0], 0), np.int32)
    ids, mask, slots = _prepare(model, input_ids, attention_mask, max_new_tokens, prompt_bucket)
    graphdef, state = nnx.split(model)
    px = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    layers, unstack = decode_layers(model, graphdef, state, max_new_tokens)
    out = _generate_jit(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        px,
        jnp.int32(max_new_tokens),
        jnp.int32(eos),
        jnp.int32(pad),
        jax.random.PRNGKey(seed),
        layers,
        slots=slots,
        max_tokens=bucket(max_new_tokens),
        sampling=SamplingConfig(do_sample, temperature, top_k, top_p),
        unstack=unstack,
    )
    return np.asarray(out)[:, :max_new_tokens]


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill_jit(graphdef, state, ids, mask, pixel_values, layers=None, *, slots):
    return _prefill(nnx.merge(graphdef, state), ids, mask, pixel_values, slots, layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "transpose"))
def _layer_list_jit(graphdef, state, transpose: bool = True):
    return layer_list(nnx.merge(graphdef, state).llm.layers, transpose=transpose)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _stream_step_jit(graphdef, state, logits, cache, pos, rng, layers=None, *, sampling):
    model = nnx.merge(graphdef, state)
    tok = sample_logits(logits, rng, sampling)
    pos = pos + 1
    logits, cache = _step(model, tok, cache, pos, layers)
    return tok, logits, cache, pos


def stream(
    model,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Yield the next token of every row ([batch] int array) step by step, until all hit `</s>`."""
    cfg = model.config
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    ids, mask, slots = _prepare(model, input_ids, attention_mask, max_new_tokens, None)
    graphdef, state = nnx.split(model)
    px = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    layers, _ = decode_layers(model, graphdef, state, None)
    logits, cache, pos = _prefill_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), px, layers, slots=slots)
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    rng = jax.random.PRNGKey(seed)
    done = np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok, logits, cache, pos = _stream_step_jit(graphdef, state, logits, cache, pos, sub, layers, sampling=sampling)
        tok = np.asarray(tok)
        yield tok
        done |= tok == eos
        if done.all():
            return
