"""Continuous batching: prefill a request into a free decode slot while the others keep decoding.

JetStream's scheme on our model. The engine owns one KV cache of [layers, slots, max_len,
kv_heads, head_dim] (on CPU: per layer, chunks of [slots, kv_heads, positions, head_dim]).
A new request (its images included) is prefilled at a bucketed prompt length, right-padded,
alone or with up to `prefill_batch` - 1 other waiting requests in one program, and its
keys/values are written into a free slot's row; its first token is sampled in the same
program. One compiled decode step then advances every
slot by one token: each slot has its own length (where its next key/value is written and
its RoPE position), its own temperature / top_p / seed, and attends to its own row only.
A request finishes on `</s>`, a stop string or its token limit, and its slot is free for
the next request at once; a cancelled request (the client went away) frees it too.

Every program is compiled before the server says it is ready (`warmup`): one prefill per
prompt bucket and prefill batch size (1 and `prefill_batch`), one decode step per
attention window (the step attends to the first W cache positions, W the smallest window
that holds the longest active row, so short answers do not read the whole cache). Nothing
compiles on the request path; `compile_count` counts XLA compilations in the process so
that tests and /metrics can check it.

Greedy answers equal `qilin_jax.generate`'s for the same prompt and image: the same model
functions (`_qkv`, `_out_mlp`, RoPE, the XLA attention's math), positions 0..n-1 and masked
padding; a request's tokens do not depend on which slot it gets or what the other slots
hold (each row of the step is computed independently, masked keys weigh exactly zero).

Why one file (over 450 lines): the compiled programs and the scheduler that drives them
share the slot state (cache rows, lengths, sampling settings); split, one state machine would
be read across files.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qilin_jax.infer.common import IncrementalDecoder
from qilin_jax.infer.generate import decode_layers, prompt_length_bucket
from qilin_jax.models.attention import _MASKED, attention
from qilin_jax.models.common import DTYPES, rms_norm, scan_layers, stacked_values
from qilin_jax.models.llama import MATRICES, KVCache, _out_mlp, _qkv, rope_cos_sin
from qilin_jax.models.lora import SUFFIX_A

log = logging.getLogger("qilin_jax.serve")

# --- compilation counter --------------------------------------------------------------------

_COMPILES = [0]
_COMPILE_LOCK = threading.Lock()
_LISTENING = [False]


def _on_event(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        with _COMPILE_LOCK:
            _COMPILES[0] += 1


def compile_count() -> int:
    """XLA programs compiled in this process since the engine module started counting."""
    if not _LISTENING[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING[0] = True
    return _COMPILES[0]


compile_count()  # start counting at import


# --- sampling -------------------------------------------------------------------------------


def sample_rows(logits, temperature, top_p, seed, count):
    """Next tokens [rows] from logits [rows, vocab], each row with its own settings: greedy where
    temperature <= 0, else softmax(logits / temperature) cut to the top_p nucleus, drawn with
    the key fold_in(PRNGKey(seed), count) (a request's draws depend on its seed and token
    index only, not on its slot or the other requests)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample = temperature > 0

    def sampled(_):
        scaled = logits / jnp.where(sample, temperature, 1.0)[:, None]

        def nucleus(x):  # generate.sample_logits' rule, top_p per row
            srt = jnp.sort(x, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(srt, axis=-1)
            cum = jnp.cumsum(probs, axis=-1)
            idx = jnp.sum(cum - probs < top_p[:, None], axis=-1, keepdims=True) - 1
            cutoff = jnp.take_along_axis(srt, idx, axis=-1)
            return jnp.where((x < cutoff) & (top_p[:, None] < 1.0), -jnp.inf, x)

        scaled = jax.lax.cond(jnp.any(sample & (top_p < 1.0)), nucleus, lambda x: x, scaled)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed, count)
        drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, scaled).astype(jnp.int32)
        return jnp.where(sample, drawn, greedy)

    # All-greedy batches (the common case) skip the sort and the draws.
    return jax.lax.cond(jnp.any(sample), sampled, lambda _: greedy, None)


# --- the compiled programs ------------------------------------------------------------------


def _prefill_insert(graphdef, state, layers, k, v, ids, n, pixels, slot, temperature, top_p, seed):
    """Prefill B right-padded prompts ids [B, T] (n [B] real tokens) with their images pixels
    [B, 1, 3, H, W], write row b's keys/values into cache row slot[b], and sample each first
    token: (k, v, tokens [B]). Rows are computed independently (a row's values do not depend
    on the others); a row repeated with the same slot writes the same values twice."""
    model = nnx.merge(graphdef, state)
    cfg = model.config.text
    B, T = ids.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    mask = (pos < n[:, None]).astype(jnp.int32)
    cache = KVCache.init(cfg, B, T, jax.tree.leaves(k)[0].dtype)
    emb = model.embed_inputs(ids, pixels)
    hidden, cache = model.llm(emb, segment_ids=mask, position_ids=pos, cache=cache, layers=layers)
    last = jnp.take_along_axis(hidden, (n - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.llm.logits(last)[:, 0]
    tok = sample_rows(logits, temperature, top_p, seed, jnp.zeros((B,), jnp.int32))
    for b in range(B):
        if isinstance(k, tuple):  # CPU: per layer, chunks of positions, heads before positions
            k = tuple(_insert_chunks(chunks, cache.k[i][b : b + 1], slot[b]) for i, chunks in enumerate(k))
            v = tuple(_insert_chunks(chunks, cache.v[i][b : b + 1], slot[b]) for i, chunks in enumerate(v))
        else:
            k = jax.lax.dynamic_update_slice(k, cache.k[:, b : b + 1], (0, slot[b], 0, 0, 0))
            v = jax.lax.dynamic_update_slice(v, cache.v[:, b : b + 1], (0, slot[b], 0, 0, 0))
    return k, v, tok


def _insert_chunks(chunks, kv, slot):
    """The chunked per-layer cache `chunks` (each [slots, kv_heads, C, head_dim]) with a
    prefilled row kv [1, T, kv_heads, head_dim] written into row `slot` (positions < T)."""
    out, a, T = [], 0, kv.shape[1]
    for c in chunks:
        n = min(c.shape[2], T - a)
        if n > 0:
            piece = jnp.swapaxes(kv[:, a : a + n], 1, 2).astype(c.dtype)  # [1, kv_heads, n, hd]
            c = jax.lax.dynamic_update_slice(c, piece, (slot, 0, 0, 0))
        out.append(c)
        a += c.shape[2]
    return tuple(out)


def _write_chunks(chunks, x, rows, lens):
    """The chunked cache with x [slots, kv_heads, head_dim] written at position lens[s] of row s
    (the chunk holding that position; the others drop the write)."""
    out, a = [], 0
    for c in chunks:
        C = c.shape[2]
        off = jnp.where((lens >= a) & (lens < a + C), lens - a, C)  # C: out of range, dropped
        out.append(c.at[rows, :, off].set(x.astype(c.dtype), mode="drop"))
        a += C
    return tuple(out)


def _chunked_attention(q, ks, vs, lens, dtype):
    """Decode attention of q [slots, 1, heads, hd] over the cache chunks ks / vs (each
    [slots, kv_heads, C, hd]), row s seeing positions <= lens[s]: [slots, 1, heads, hd].

    The math and dtypes of attention.py's XLA softmax attention (float32 scores, the same
    finite mask value, normalised probabilities times values); the chunks are whole arrays,
    so a window of them is read in place: slicing a window out of one [slots, positions, ...]
    array made XLA:CPU copy and transpose it at every layer (most of a 16-slot step)."""
    S, _, H, d = q.shape
    KV = ks[0].shape[1]
    qg = q.reshape(S, KV, H // KV, d)
    s = jnp.concatenate(
        [jnp.einsum("skgd,skwd->skgw", qg, c.astype(dtype), preferred_element_type=jnp.float32) for c in ks], axis=-1
    ) * (1.0 / float(d) ** 0.5)
    valid = jnp.arange(s.shape[-1])[None, :] <= lens[:, None]
    s = jnp.where(valid[:, None, None, :], s, _MASKED)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    o, a = 0.0, 0
    for c in vs:
        C = c.shape[2]
        o = o + jnp.einsum(
            "skgw,skwd->skgd", p[..., a : a + C].astype(dtype), c.astype(dtype), preferred_element_type=jnp.float32
        )
        a += C
    return o.reshape(S, 1, H, d).astype(q.dtype)


def _feature_major(p) -> bool:
    """Whether a CPU layer dict holds every matrix as a plain [out, in] `<name>_t` array (no
    LoRA adapter, nothing quantized): the layers `_layers_feature_major` runs."""
    return all(m + "_t" in p for m in MATRICES) and not any(m + SUFFIX_A in p for m in MATRICES)


def _layers_feature_major(layers, x, k, v, cfg, cos, sin, rows, lens, window: int, dtype):
    """The decoder layers of one CPU decode step with the activations kept [features, slots]:
    every projection is W [out, in] @ h [in, slots]. With slots as the narrow dimension of
    the product XLA:CPU runs the layers' matmuls in ~2/3 of the time of h [slots, in] @ W
    [in, out] at 8-32 slots (bench/serve.py; docs/serving.md); the attention reads the
    chunked cache as before. The same math as `_qkv` / `_out_mlp` (RMSNorm in float32, RoPE,
    SwiGLU), transposed. Returns (x [slots, 1, embed], k chunks, v chunks)."""
    S = x.shape[0]
    H, KV, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    half = hd // 2
    cos_t, sin_t = cos[:, 0].T.astype(dtype), sin[:, 0].T.astype(dtype)  # [hd, S]

    def rope(t):  # llama.apply_rope on [heads, hd, S]
        rot = jnp.concatenate([-t[:, half:], t[:, :half]], axis=1)
        return t * cos_t + rot * sin_t

    def mm(p, name, h):
        return p[name + "_t"].astype(dtype) @ h

    ks, vs = list(k), list(v)
    n = -(-window // ks[0][0].shape[2])  # the chunks that hold the window
    xt = x[:, 0].T  # [D, S]
    for i, p in enumerate(layers):
        h = rms_norm(xt, p["attn_norm"], eps, axis=0)
        q = rope(mm(p, "q_proj", h).reshape(H, hd, S))
        kk = rope(mm(p, "k_proj", h).reshape(KV, hd, S))
        vv = mm(p, "v_proj", h).reshape(KV, hd, S)
        ks[i] = _write_chunks(ks[i], jnp.transpose(kk, (2, 0, 1)), rows, lens)
        vs[i] = _write_chunks(vs[i], jnp.transpose(vv, (2, 0, 1)), rows, lens)
        out = _chunked_attention(jnp.transpose(q, (2, 0, 1))[:, None], ks[i][:n], vs[i][:n], lens, dtype)
        xt = xt + mm(p, "o_proj", out.reshape(S, H * hd).T.astype(dtype))
        h = rms_norm(xt, p["mlp_norm"], eps, axis=0)
        xt = xt + mm(p, "down_proj", jax.nn.silu(mm(p, "gate_proj", h)) * mm(p, "up_proj", h))
    return xt.T[:, None], tuple(ks), tuple(vs)


def _decode(graphdef, state, layers, k, v, tok, lens, temperature, top_p, seed, count, *, window: int):
    """One decode step for every slot: token tok[s] is written at position lens[s] of row s, which
    then attends to its first lens[s] + 1 positions (all < window): (k, v, next tokens [slots])."""
    model = nnx.merge(graphdef, state)
    llm = model.llm
    cfg = llm.cfg
    dtype = DTYPES[llm.dtype]
    S = tok.shape[0]
    rows = jnp.arange(S)
    x = llm.embed(tok[:, None])  # [S, 1, D]
    cos, sin = rope_cos_sin(lens[:, None], cfg)
    mask = (jnp.arange(window)[None, :] <= lens[:, None])[:, None, None, :]  # [S, 1, 1, W]

    def attend(p, h, q, kw, vw):
        out = attention(q, kw.astype(dtype), vw.astype(dtype), mask=mask, causal=False, implementation="xla")
        return _out_mlp(p, h, out, cfg, dtype)

    def block(p, h, k, v, i):
        q, kk, vv = _qkv(p, h, cfg, cos, sin, dtype)
        # One position per row written in place into the stacked cache; the attention reads
        # only the first `window` positions of this layer.
        k = k.at[i, rows, lens].set(kk[:, 0].astype(k.dtype))
        v = v.at[i, rows, lens].set(vv[:, 0].astype(v.dtype))
        kw = jax.lax.dynamic_slice(k, (i, 0, 0, 0, 0), (1, S, window) + k.shape[3:])[0]
        vw = jax.lax.dynamic_slice(v, (i, 0, 0, 0, 0), (1, S, window) + v.shape[3:])[0]
        return attend(p, h, q, kw, vw), k, v

    if layers is not None and _feature_major(layers[0]):
        x, k, v = _layers_feature_major(layers, x, k, v, cfg, cos, sin, rows, lens, window, dtype)
    elif layers is not None:
        # CPU with adapters or quantized matrices on the layers: row-major, through _proj.
        ks, vs = list(k), list(v)
        n = -(-window // ks[0][0].shape[2])  # the chunks that hold the window
        for i, p in enumerate(layers):
            q, kk, vv = _qkv(p, x, cfg, cos, sin, dtype)
            ks[i] = _write_chunks(ks[i], kk[:, 0], rows, lens)
            vs[i] = _write_chunks(vs[i], vv[:, 0], rows, lens)
            out = _chunked_attention(q, ks[i][:n], vs[i][:n], lens, dtype)
            x = _out_mlp(p, x, out, cfg, dtype)
        k, v = tuple(ks), tuple(vs)
    else:

        def body(carry, xs):
            h, k, v = carry
            p, i = xs
            h, k, v = block(p, h, k, v, i)
            return (h, k, v), None

        ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        (x, k, v), _ = scan_layers(body, (x, k, v), (stacked_values(llm.layers), ids))
    x = rms_norm(x, llm.norm.get_value(), cfg.rms_norm_eps)
    logits = llm.logits(x)[:, 0]
    return k, v, sample_rows(logits, temperature, top_p, seed, count)


# --- requests -------------------------------------------------------------------------------


class QueueFull(Exception):
    """The waiting queue is full; retry later."""


@dataclasses.dataclass
class Event:
    """What the engine reports about a request: a text piece, or the end (finish_reason set)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str = ""


_IDS = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: prompt ids (1-D), pixel values [1, 3, S, S] or None, limits and sampling.

    `on_event` is called from the engine thread with each Event; `cancel()` from any thread.
    After the end: `tokens` (generated ids, `</s>` included), `text` (the answer, stop strings
    cut), `finish_reason`, and timestamps for TTFT / latency.
    """

    ids: np.ndarray
    pixels: np.ndarray | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    on_event: Callable[[Event], None] | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_IDS))
    tokens: list = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request (its slot is freed before the next step)."""
        self.cancelled = True


# --- the engine -----------------------------------------------------------------------------


def default_buckets(max_len: int) -> list[int]:
    """Every prompt length bucket `prompt_length_bucket` gives up to max_len (max_len the last)."""
    return sorted({min(prompt_length_bucket(n), max_len) for n in range(1, max_len + 1)})


def decode_windows(max_len: int, smallest: int = 64) -> list[int]:
    """Attention windows of the decode step: powers of two from `smallest` below max_len, and max_len."""
    out, w = [], smallest
    while w < max_len:
        out.append(w)
        w *= 2
    return out + [max_len]


class Engine:
    """Continuous batching over `slots` decode slots (see the module docstring).

    `start()` compiles every program (`warmup`) and runs the scheduling loop in a thread;
    `submit(request)` queues a request (QueueFull past `max_queue` waiting);
    `generate(ids, pixels, ...)` is the blocking form. Use it within the model's mesh: the
    cache is sharded like the activations (kv heads over `tensor`, slots over `data`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        slots: int = 8,
        max_len: int = 0,
        prompt_buckets: Sequence[int] = (),
        max_queue: int = 64,
        prefill_batch: int = 4,
        mesh=None,
        tokenizer_lock: threading.Lock | None = None,
    ):
        cfg = model.config
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.slots = int(slots)
        self.max_len = int(max_len or cfg.text.max_position_embeddings)
        if self.max_len > cfg.text.max_position_embeddings:
            raise ValueError(
                f"max_len {self.max_len} exceeds the model's max_position_embeddings {cfg.text.max_position_embeddings}"
            )
        self.buckets = (
            sorted({b for b in prompt_buckets if b < self.max_len} | {self.max_len})
            if prompt_buckets
            else default_buckets(self.max_len)
        )
        self.windows = decode_windows(self.max_len)
        self.max_queue = int(max_queue)
        # Prompts waiting together are prefilled together (one program of this many rows):
        # bigger products run nearer the device's matmul rate than one prompt at a time.
        self.prefill_batch = max(1, min(int(prefill_batch), self.slots))
        self.eos_id = tokenizer.eos_token_id
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.image_shape = (1, 3, cfg.vision.image_size, cfg.vision.image_size)

        self.graphdef, self.state = nnx.split(model)
        # CPU: the layers unstacked once for the server's life, [out, in] (the copy generate
        # decodes with; shared with it when the model fits the layer cache): the step runs
        # them feature-major (`_layers_feature_major`), prefill as x @ W.T.
        self.layers, _ = decode_layers(model, self.graphdef, self.state, None)
        text = cfg.text
        shape = (text.num_hidden_layers, self.slots, self.max_len, text.num_key_value_heads, text.head_dim)
        dtype = DTYPES[cfg.dtype]
        per_layer = self.layers is not None  # CPU: per layer, chunks of positions (see _decode)
        # CPU chunks: the smallest decode window's positions each, so every window is whole chunks.
        C = self.windows[0]
        self.chunks = [(a, min(a + C, self.max_len)) for a in range(0, self.max_len, C)]
        sh = None
        kw = {}
        if mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            data, tensor = mesh.shape.get("data", 1), mesh.shape.get("tensor", 1)
            slots_ax = "data" if self.slots % data == 0 and data > 1 else None
            heads_ax = "tensor" if text.num_key_value_heads % tensor == 0 and tensor > 1 else None
            if per_layer:  # [slots, kv_heads, positions, head_dim] chunks
                sh = NamedSharding(mesh, P(slots_ax, heads_ax, None, None))
                cache_sh = ((sh,) * len(self.chunks),) * shape[0]
            else:  # [layers, slots, positions, kv_heads, head_dim]
                sh = NamedSharding(mesh, P(None, slots_ax, None, heads_ax, None))
                cache_sh = sh
            # Fixed output shardings: a cache that came back sharded differently would be a new
            # input signature, i.e. a compilation on the request path.
            kw = dict(out_shardings=(cache_sh, cache_sh, NamedSharding(mesh, P())))

        def zeros(shp):
            # Placed explicitly (committed), like the programs' outputs that replace them: an
            # uncommitted first cache would be a second input signature.
            return jax.device_put(jnp.zeros(shp, dtype), sh if sh is not None else jax.devices()[0])

        if per_layer:
            chunk_shapes = [(self.slots, text.num_key_value_heads, b - a, text.head_dim) for a, b in self.chunks]
            self.k = tuple(tuple(zeros(c) for c in chunk_shapes) for _ in range(shape[0]))
            self.v = tuple(tuple(zeros(c) for c in chunk_shapes) for _ in range(shape[0]))
        else:
            self.k, self.v = zeros(shape), zeros(shape)
        self._prefill = jax.jit(_prefill_insert, static_argnums=(0,), donate_argnums=(3, 4), **kw)
        self._decode = jax.jit(_decode, static_argnums=(0,), static_argnames=("window",), donate_argnums=(3, 4), **kw)

        S = self.slots
        self.slot_req: list[Request | None] = [None] * S
        self.decoders: list[IncrementalDecoder | None] = [None] * S
        self.tok = np.zeros(S, np.int32)
        self.lens = np.zeros(S, np.int32)
        self.count = np.zeros(S, np.int32)
        self.temp = np.zeros(S, np.float32)
        self.top_p = np.ones(S, np.float32)
        self.seed = np.zeros(S, np.int32)
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.ready = False
        self.ready_compiles: int | None = None
        self.steps = 0
        self.generated = 0
        self.on_finish: Callable[[Request], None] | None = None  # metrics hook

    # -- introspection
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    def slots_in_use(self) -> int:
        """Slots holding a request."""
        return sum(r is not None for r in self.slot_req)

    def bucket_for(self, n: int) -> int:
        """The prompt bucket a prompt of n tokens is prefilled at (ValueError past the largest)."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets[-1]}")

    def check(self, n_prompt: int, max_tokens: int) -> None:
        """ValueError when a prompt of n_prompt tokens plus max_tokens does not fit a slot."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if n_prompt < 1:
            raise ValueError("the prompt is empty")
        if n_prompt + max_tokens > self.max_len:
            raise ValueError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is "
                f"{n_prompt + max_tokens} tokens, more than the context of {self.max_len}"
            )

    # -- lifecycle
    def warmup(self) -> float:
        """Compile every prefill bucket (at 1 and `prefill_batch` rows) and decode window (each
        run twice, so that a second input signature would show now); returns the seconds it took."""
        from qilin_jax.infer.sharded import inference_sharding

        t0 = time.perf_counter()
        with inference_sharding(self.mesh):  # activation constraints are read at trace time
            self._warmup()
        return time.perf_counter() - t0

    def _warmup(self) -> None:
        S = self.slots
        for round_ in range(2):
            before = compile_count()
            for T, B in itertools.product(self.buckets, sorted({1, self.prefill_batch})):
                self.k, self.v, tok = self._prefill(
                    self.graphdef,
                    self.state,
                    self.layers,
                    self.k,
                    self.v,
                    np.zeros((B, T), np.int32),
                    np.ones(B, np.int32),
                    np.zeros((B, 1) + self.image_shape[1:], np.float32),
                    np.zeros(B, np.int32),
                    np.zeros(B, np.float32),
                    np.ones(B, np.float32),
                    np.zeros(B, np.int32),
                )
                np.asarray(tok)
            for W in self.windows:
                self.k, self.v, tok = self._decode(
                    self.graphdef,
                    self.state,
                    self.layers,
                    self.k,
                    self.v,
                    np.zeros(S, np.int32),
                    np.zeros(S, np.int32),
                    np.zeros(S, np.float32),
                    np.ones(S, np.float32),
                    np.zeros(S, np.int32),
                    np.zeros(S, np.int32),
                    window=W,
                )
                np.asarray(tok)
            if round_ == 1 and compile_count() != before:
                log.warning("serve warm-up: %d programs compiled again on the second round", compile_count() - before)

    def start(self) -> None:
        """Warm up (compile everything), then run the scheduling loop in a daemon thread."""
        secs = self.warmup()
        log.info(
            "serve: compiled %d prefill buckets %s and %d decode windows %s in %.1f s",
            len(self.buckets),
            self.buckets,
            len(self.windows),
            self.windows,
            secs,
        )
        self.thread = threading.Thread(target=self._loop, name="qilin-serve-engine", daemon=True)
        self.thread.start()
        self.ready_compiles = compile_count()
        self.ready = True

    def stop(self) -> None:
        """Stop the loop; queued and running requests end with finish_reason "cancelled"."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, req: Request) -> Request:
        """Queue a request; QueueFull when `max_queue` are already waiting for a slot."""
        self.check(len(req.ids), req.max_tokens)
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            # max_queue waiting beyond those the free slots will take at the next step
            if len(self.waiting) >= self.max_queue + self.slots - self.slots_in_use():
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
            req.submitted = time.perf_counter()
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def generate(
        self,
        ids,
        pixels=None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Request:
        """Submit and wait: the finished Request (tokens, text, finish_reason)."""
        req = self.submit(Request(np.asarray(ids, np.int32), pixels, max_tokens, temperature, top_p, seed, stop))
        if not req.done.wait(timeout):
            req.cancel()
            raise TimeoutError(f"request {req.id} not finished after {timeout} s")
        return req

    # -- the loop
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and self.slots_in_use() == 0:
                    self.cond.wait(timeout=1.0)
                if self.stopping:
                    break
            try:
                self._admit()
                self._drop_cancelled()
                if self.slots_in_use():
                    self._step()
            except Exception as e:
                log.exception("serve: engine step failed")
                for s, r in enumerate(self.slot_req):
                    if r is not None:
                        self._finish(s, "error", f"{type(e).__name__}: {e}")
        with self.cond:
            rest = list(self.waiting)
            self.waiting.clear()
        for r in rest:
            self._end(r, "cancelled")
        for s, r in enumerate(self.slot_req):
            if r is not None:
                self._finish(s, "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, up to `prefill_batch` of them per program."""
        while True:
            free = [s for s in range(self.slots) if self.slot_req[s] is None]
            if not free:
                return
            group, cancelled = [], []
            with self.cond:
                while self.waiting and len(group) < min(len(free), self.prefill_batch):
                    req = self.waiting.popleft()
                    (cancelled if req.cancelled else group).append(req)
            for req in cancelled:
                self._end(req, "cancelled")
            if not group:
                if cancelled:
                    continue
                return
            slots = free[: len(group)]
            try:
                self._insert(slots, group)
            except Exception:
                # Prefill them one by one, so that only a request that fails alone gets the error.
                for s, req in zip(slots, group):
                    try:
                        self._insert([s], [req])
                    except Exception as e:
                        log.exception("serve: prefill failed for request %d", req.id)
                        self.slot_req[s] = None
                        self._end(req, "error", f"{type(e).__name__}: {e}")

    def _insert(self, slots: list[int], reqs: list[Request]) -> None:
        """Prefill reqs into slots in one program: the one-row program for one request, else the
        `prefill_batch`-row one (its spare rows repeat the last request into the same slot)."""
        B = 1 if len(reqs) == 1 else self.prefill_batch
        rows = list(zip(slots, reqs)) + [(slots[-1], reqs[-1])] * (B - len(reqs))
        T = max(self.bucket_for(len(r.ids)) for r in reqs)
        ids = np.full((B, T), self.model.config.text.pad_token_id, np.int32)
        px = np.zeros((B, 1) + self.image_shape[1:], np.float32)
        n, slot = np.zeros(B, np.int32), np.zeros(B, np.int32)
        temp, top_p, seed = np.zeros(B, np.float32), np.ones(B, np.float32), np.zeros(B, np.int32)
        for b, (s, req) in enumerate(rows):
            ids[b, : len(req.ids)] = req.ids
            if req.pixels is not None:
                px[b, 0] = np.asarray(req.pixels, np.float32).reshape(self.image_shape[1:])
            n[b], slot[b] = len(req.ids), s
            temp[b], top_p[b], seed[b] = max(req.temperature, 0.0), req.top_p, req.seed % (2**31)
        self.k, self.v, tok = self._prefill(
            self.graphdef, self.state, self.layers, self.k, self.v, ids, n, px, slot, temp, top_p, seed
        )
        tok = np.asarray(tok)
        for b, (s, req) in enumerate(zip(slots, reqs)):
            self.slot_req[s] = req
            self.decoders[s] = IncrementalDecoder(self.tokenizer, req.stop, self.eos_id)
            self.lens[s], self.count[s] = n[b], 1
            self.temp[s], self.top_p[s], self.seed[s] = temp[b], top_p[b], seed[b]
            self._accept(s, int(tok[b]))

    def _drop_cancelled(self) -> None:
        for s, r in enumerate(self.slot_req):
            if r is not None and r.cancelled:
                self._finish(s, "cancelled")

    def _step(self) -> None:
        active = [s for s in range(self.slots) if self.slot_req[s] is not None]
        longest = int(self.lens[active].max()) + 1
        window = next(w for w in self.windows if w >= longest)
        self.k, self.v, tok = self._decode(
            self.graphdef,
            self.state,
            self.layers,
            self.k,
            self.v,
            self.tok,
            self.lens,
            self.temp,
            self.top_p,
            self.seed,
            self.count,
            window=window,
        )
        tok = np.asarray(tok)
        self.steps += 1
        for s in active:
            self.lens[s] += 1
            self.count[s] += 1
            self._accept(s, int(tok[s]))

    def _accept(self, s: int, token: int) -> None:
        req, dec = self.slot_req[s], self.decoders[s]
        self.tok[s] = token
        req.tokens.append(token)
        self.generated += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        with self.tokenizer_lock:
            piece = dec.push(token)
        if piece:
            self._emit(req, Event(text=piece))
        if dec.stopped:
            self._finish(s, "stop")
        elif len(req.tokens) >= req.max_tokens:
            with self.tokenizer_lock:
                piece = dec.flush()
            if piece:
                self._emit(req, Event(text=piece))
            self._finish(s, "length")

    def _finish(self, s: int, reason: str, error: str = "") -> None:
        req, dec = self.slot_req[s], self.decoders[s]
        self.slot_req[s], self.decoders[s] = None, None
        self.lens[s] = self.count[s] = self.tok[s] = 0
        self.temp[s], self.top_p[s] = 0.0, 1.0
        if dec is not None:
            with self.tokenizer_lock:
                req.text = dec.text
        self._end(req, reason, error)

    def _end(self, req: Request, reason: str, error: str = "") -> None:
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        self._emit(req, Event(finish_reason=reason, error=error))
        req.done.set()
        if self.on_finish is not None:
            try:
                self.on_finish(req)
            except Exception:
                log.exception("serve: on_finish hook failed")

    @staticmethod
    def _emit(req: Request, ev: Event) -> None:
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception:
                log.exception("serve: event consumer of request %d failed", req.id)
                req.cancel()
