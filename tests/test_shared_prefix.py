"""train.shared_prefix: the template's preamble computed once per batch instead of once per row.

The preamble is what every tokenized conversation of a template starts with; a batch whose
rows all start with it is cut (`split_shared_prefix`) and the model runs the prefix once, the
rows attending to it (`QilinMedVL(..., prefix_ids=)`). That must be exact: the same loss,
logits and gradients as the whole rows. (The full training run with it on is compared with
one without it in tests/test_train_resume.py.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qilin_jax.data.conversation import IGNORE_INDEX, template_preamble, tokenize_conversation
from qilin_jax.train.distributed import common_batch
from qilin_jax.train.shared_prefix import split_shared_prefix
from tests.infer_fixtures import random_model, tiny_config

CONVERSATIONS = [
    [{"from": "human", "value": "<image>\n病灶位于图像的哪个位置？"}, {"from": "gpt", "value": "左上"}],
    [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A CT slice."}],
    [
        {"from": "human", "value": "这张图像属于哪种检查方式？<image>"},
        {"from": "gpt", "value": "CT"},
        {"from": "human", "value": "有几个病灶？"},
        {"from": "gpt", "value": "2"},
    ],
    [{"from": "human", "value": " 1) 选项"}, {"from": "gpt", "value": "B"}],
]


@pytest.mark.parametrize("template", ["v1", "llava_v1", "llava_llama_2"])
def test_template_preamble_starts_every_conversation(tokenizer, template):
    pre = template_preamble(tokenizer, template, image_token_id=4000)
    assert len(pre) >= 20 and pre[0] == tokenizer.bos_token_id and 4000 not in pre
    for conv in CONVERSATIONS:
        ids, labels = tokenize_conversation(conv, tokenizer, template, image_tokens=16, image_token_id=4000)
        assert np.array_equal(ids[: len(pre)], pre), (template, conv)
        assert np.all(labels[: len(pre) + 1] == IGNORE_INDEX)
    if template == "v1":  # BOS, the system prompt and the first role tag
        assert tokenizer.decode(pre, skip_special_tokens=True).endswith("questions. USER:")


def test_template_preamble_plain_is_bos_only(tokenizer):
    assert template_preamble(tokenizer, "plain", image_token_id=4000).tolist() == [tokenizer.bos_token_id]


def _batch(prefix, rows=3, tail=12, seed=0):
    """A host batch whose rows start with `prefix`, right-padded, with a label span."""
    rng = np.random.default_rng(seed)
    P, T = len(prefix), len(prefix) + tail
    ids = np.zeros((rows, T), np.int32)
    labels = np.full((rows, T), IGNORE_INDEX, np.int32)
    mask = np.zeros((rows, T), np.int32)
    for b in range(rows):
        n = T - 2 * b
        ids[b, :P] = prefix
        ids[b, P:n] = rng.integers(5, 3000, n - P)
        labels[b, n - 3 : n] = ids[b, n - 3 : n]
        mask[b, :n] = 1
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "segment_ids": mask.copy(),
        "position_ids": pos,
        "pixel_values": np.zeros((rows, 1, 3, 8, 8), np.float32),
        "image_valid": np.ones((rows, 1), bool),
    }


def test_split_shared_prefix_cuts_every_sequence_key():
    prefix = np.arange(100, 110, dtype=np.int32)
    local = _batch(prefix)
    out = split_shared_prefix(local, prefix)
    assert out is not None
    np.testing.assert_array_equal(out["prefix_ids"], prefix)
    for k in ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids"):
        np.testing.assert_array_equal(out[k], local[k][:, 10:], err_msg=k)
    assert out["pixel_values"] is local["pixel_values"] and out["image_valid"] is local["image_valid"]
    # micro-batches (gradient accumulation): rows split, the one prefix given to each
    from qilin_jax.train.step import stack_micro

    micro = stack_micro(out, 3)
    assert micro["input_ids"].shape == (3, 1, out["input_ids"].shape[1])
    np.testing.assert_array_equal(micro["prefix_ids"], np.stack([prefix] * 3))


@pytest.mark.parametrize(
    "break_it",
    ["other_token", "label_after_prefix", "label_in_prefix", "padding_in_prefix", "row_too_short", "positions"],
)
def test_split_shared_prefix_refuses_batches_it_does_not_fit(break_it):
    prefix = np.arange(100, 110, dtype=np.int32)
    local = _batch(prefix)
    if break_it == "other_token":
        local["input_ids"][2, 4] = 7
    elif break_it == "label_after_prefix":  # predicted by the prefix's last position
        local["labels"][1, 10] = local["input_ids"][1, 10]
    elif break_it == "label_in_prefix":
        local["labels"][0, 3] = 103
    elif break_it == "padding_in_prefix":
        local["attention_mask"][1, 9] = 0
    elif break_it == "row_too_short":
        local = {k: v[:, :10] if v.ndim == 2 and k != "image_valid" else v for k, v in local.items()}
    elif break_it == "positions":
        local["position_ids"] = local["position_ids"] + 1
    assert split_shared_prefix(local, prefix) is None


@pytest.mark.parametrize("other_t,other_fits", [(12, True), (30, True), (30, False), (10, False)])
def test_common_batch_one_all_gather_for_length_and_prefix(monkeypatch, other_t, other_fits):
    """common_batch with a second process (simulated: process_count 2, and an all-gather that
    adds the other process's [bucket length, prefix fits]): one all-gather per step, the
    batch padded to the longest bucket as the collator pads, and the prefix cut only when
    every process's batch allows it."""
    import jax
    from jax.experimental import multihost_utils

    prefix = np.arange(100, 110, dtype=np.int32)
    local = _batch(prefix)  # 10 + 12 = 22 columns
    calls = []

    def allgather(x):
        calls.append(np.asarray(x).tolist())
        return np.stack([np.asarray(x), np.array([other_t, other_fits], np.int32)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    padded, shared = common_batch(local, prefix)
    assert calls == [[22, 1]]
    T = max(22, other_t)
    assert padded["input_ids"].shape == (3, T)
    np.testing.assert_array_equal(padded["input_ids"][:, :22], local["input_ids"])
    assert (padded["input_ids"][:, 22:] == 0).all() and (padded["labels"][:, 22:] == IGNORE_INDEX).all()
    assert (padded["attention_mask"][:, 22:] == 0).all() and (padded["position_ids"][:, 22:] == 0).all()
    if other_fits:
        assert shared is not None and shared["input_ids"].shape == (3, T - 10)
        np.testing.assert_array_equal(shared["prefix_ids"], prefix)
    else:
        assert shared is None
    calls.clear()
    padded, shared = common_batch(local, None)  # no shared prefix: the length only
    assert calls == [[22, 0]] and shared is None and padded["input_ids"].shape == (3, T)


@pytest.mark.parametrize("supervised_only", [False, True])
def test_model_with_prefix_ids_equals_whole_rows(supervised_only):
    """Loss, gradients of every parameter and the rows' logits, with images, padding and
    remat: the prefix path against the whole rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    cfg = dataclasses.replace(tiny_config(), loss_supervised_only=supervised_only, remat="save_dots")
    graphdef, params = nnx.split(random_model(cfg, seed=1))
    rng = np.random.default_rng(0)
    B, P, tail, n_img = 3, 9, 2 + cfg.image_tokens + 12, cfg.image_tokens
    prefix = rng.integers(5, 3000, P).astype(np.int32)
    local = _batch(prefix, rows=B, tail=tail)
    local["input_ids"][:, P + 1 : P + 1 + n_img] = cfg.image_token_id  # an image inside each row
    local["pixel_values"] = rng.standard_normal((B, 1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(
        np.float32
    )
    shared = split_shared_prefix(local, prefix)
    assert shared is not None

    def run(params, b, **kw):
        model = nnx.merge(graphdef, params)
        return model(
            b["input_ids"],
            b["pixel_values"],
            labels=b["labels"],
            segment_ids=b["segment_ids"],
            position_ids=b["position_ids"],
            **kw,
        )

    def loss(params, b, **kw):
        return run(params, b, return_logits=False, **kw).loss

    lw, gw = jax.value_and_grad(loss)(params, local)
    ls, gs = jax.value_and_grad(loss)(params, shared, prefix_ids=jnp.asarray(prefix))
    np.testing.assert_allclose(float(ls), float(lw), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gw))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gs), jax.tree.leaves(gw)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path)
        )
    real = local["attention_mask"][:, P:, None] == 1
    whole = np.asarray(run(params, local).logits)[:, P:]
    part = np.asarray(run(params, shared, prefix_ids=prefix).logits)
    np.testing.assert_allclose(np.where(real, part, 0), np.where(real, whole, 0), atol=2e-5)
    # position_ids left to the model: they start at P
    default = np.asarray(
        nnx.merge(graphdef, params)(
            shared["input_ids"], shared["pixel_values"], segment_ids=shared["segment_ids"], prefix_ids=prefix
        ).logits
    )
    np.testing.assert_allclose(np.where(real, default, 0), np.where(real, whole, 0), atol=2e-5)
