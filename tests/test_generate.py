"""KV-cache generation: equal to HF llava generate, to cache-free decoding, one compile per bucket."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from qilin_jax.infer import generate as G
from qilin_jax.models import QilinMedVL, model_preset
from tests import torch_ref as R


def _cfg():
    cfg = model_preset("tiny")
    return dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size - 1)


def _prompts(cfg):
    img = cfg.image_token_id
    P = cfg.image_tokens
    rows = [
        [1, 5, 6] + [img] * P + [7, 8, 9, 10, 11],
        [1, 13] + [img] * P + [14, 15] + [img] * P + [16, 17],
        [1, 20, 21, 22],
    ]
    T = max(map(len, rows))
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for b, r in enumerate(rows):  # left padding, as HF generation expects
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    px = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    return ids, mask, px


def test_greedy_equals_hf_llava_generate():
    cfg = _cfg()
    tm = R.build("llava", cfg, seed=11)
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    R.to_jax("llava", tm, model, cfg)
    ids, mask, px = _prompts(cfg)
    with torch.no_grad():
        ref = tm.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(px),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=cfg.text.eos_token_id,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    ref_new = ref.sequences[:, ids.shape[1] :].numpy()
    ours = G.generate(model, ids, px, mask, max_new_tokens=32)
    assert ours.shape == (3, 32)
    n = ref_new.shape[1]
    for b in range(3):
        for t in range(n):
            if ours[b, t] != ref_new[b, t]:
                # Only a near-tie in the reference logits may explain a divergence.
                top2 = torch.topk(ref.scores[t][b], 2).values.numpy()
                assert top2[0] - top2[1] <= 1e-5, (b, t, ours[b, t], ref_new[b, t], top2)
                break
    assert (ours[:, n:] == 0).all()  # HF stopped early only if every row finished


def test_cache_equals_no_cache_and_right_padding():
    cfg = model_preset("tiny")  # image token id past the vocab, as in the release: never generated
    model = QilinMedVL(cfg, rngs=nnx.Rngs(3))
    ids, mask, px = _prompts(cfg)
    cached = G.generate(model, ids, px, mask, max_new_tokens=12, eos_token_id=-1)
    # Cache-free reference: the full forward pass on the growing sequence, row by row.
    img_start = 0
    for b in range(3):
        row = list(ids[b][mask[b] == 1])
        n_img = sum(1 for i in range(1, len(row)) if row[i] == cfg.image_token_id and row[i - 1] != cfg.image_token_id)
        rpx = px[img_start : img_start + n_img] if n_img else None
        img_start += n_img
        for t in range(12):
            logits = model(np.asarray([row]), rpx).logits
            nxt = int(jnp.argmax(logits[0, -1]))
            assert nxt == cached[b, t], (b, t)
            row.append(nxt)
    # Right-padded input gives the same tokens (generate left-aligns internally).
    right = np.zeros_like(ids)
    rmask = np.zeros_like(mask)
    for b in range(3):
        toks = ids[b][mask[b] == 1]
        right[b, : len(toks)] = toks
        rmask[b, : len(toks)] = 1
    np.testing.assert_array_equal(G.generate(model, right, px, rmask, max_new_tokens=12, eos_token_id=-1), cached)


def test_one_compile_per_bucket_and_eos_padding():
    cfg = model_preset("tiny")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(4))
    ids, mask, px = _prompts(cfg)
    G.generate(model, ids, px, mask, max_new_tokens=3)
    before = G._generate_jit._cache_size()
    for n in (5, 7, 16):  # same new-token bucket (16): no new program
        G.generate(model, ids, px, mask, max_new_tokens=n)
    assert G._generate_jit._cache_size() == before
    G.generate(model, ids, px, mask, max_new_tokens=17)  # next bucket: one more
    assert G._generate_jit._cache_size() == before + 1
    out = G.generate(model, ids, px, mask, max_new_tokens=16, eos_token_id=None)
    first = G.generate(model, ids, px, mask, max_new_tokens=16, eos_token_id=int(out[0, 2]))
    assert (first[0, 3:] == 0).all() and first[0, 2] == out[0, 2]


def test_sampling_is_seeded_and_respects_top_k():
    cfg = model_preset("tiny")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(5))
    ids, mask, px = _prompts(cfg)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=1, eos_token_id=-1)
    greedy = G.generate(model, ids, px, mask, max_new_tokens=8, eos_token_id=-1)
    np.testing.assert_array_equal(G.generate(model, ids, px, mask, seed=1, **kw), greedy)  # top-1 == greedy
    a = G.generate(model, ids, px, mask, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7, eos_token_id=-1)
    b = G.generate(model, ids, px, mask, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7, eos_token_id=-1)
    np.testing.assert_array_equal(a, b)


def test_stream_matches_generate():
    cfg = model_preset("tiny")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(6))
    ids, mask, px = _prompts(cfg)
    full = G.generate(model, ids, px, mask, max_new_tokens=6, eos_token_id=-1)
    steps = np.stack(list(G.stream(model, ids, px, mask, max_new_tokens=6, eos_token_id=-1)), axis=1)
    np.testing.assert_array_equal(steps, full)


def test_short_calls_layer_cache_and_prompt_buckets(monkeypatch):
    """Every layer path gives the same tokens: the cached unstacked layers (prefill and decode),
    a per-call copy, and the stacked scan (calls of 1-2 new tokens without the cache); the
    cache is reused while the parameters are the same arrays and remade when they change."""
    cfg = model_preset("tiny")
    model = QilinMedVL(cfg, rngs=nnx.Rngs(6))
    ids, mask, px = _prompts(cfg)
    long = G.generate(model, ids, px, mask, max_new_tokens=8, eos_token_id=-1)  # cached layers
    graphdef, state = nnx.split(model)
    cached = G.cached_layers(model, graphdef, state)
    assert cached is not None and G.cached_layers(model, graphdef, state) is cached
    monkeypatch.setattr(G, "LAYER_CACHE_MAX_BYTES", 0)  # too big to cache: per-call paths
    assert G.cached_layers(model, graphdef, state) is None
    np.testing.assert_array_equal(G.generate(model, ids, px, mask, max_new_tokens=8, eos_token_id=-1), long)
    for n in (1, 2):
        assert n < G.UNSTACK_MIN_NEW_TOKENS
        np.testing.assert_array_equal(G.generate(model, ids, px, mask, max_new_tokens=n, eos_token_id=-1), long[:, :n])
    monkeypatch.undo()
    # New parameter values: the cache is remade, and generation follows the new weights.
    w = model.llm.layers.down_proj
    w.set_value(w.get_value() * 3.0)
    fresh = G.cached_layers(model, graphdef, nnx.split(model)[1])
    assert fresh is not cached
    np.testing.assert_array_equal(fresh[0]["down_proj_t"], np.asarray(w.get_value())[0].T)
    assert G.generate(model, ids, px, mask, max_new_tokens=0).shape == (3, 0)
    # Prompt buckets: >= n, at most 25% padding past 64, four per doubling.
    sizes = [G.prompt_length_bucket(n) for n in range(1, 2049)]
    assert all(b >= n for n, b in zip(range(1, 2049), sizes)) and sizes == sorted(sizes)
    assert all(b <= max(64, 1.25 * n) for n, b in zip(range(1, 2049), sizes))
    assert sorted(set(b for b in sizes if 128 < b <= 256)) == [160, 192, 224, 256]
