"""The same train steps on meshes of 8 simulated CPU devices equal one device."""

import jax
import numpy as np
import pytest

from qilin_jax import sharding as S
from qilin_jax.config import StageConfig
from qilin_jax.models import model_preset
from qilin_jax.train.distributed import batch_shardings, to_global
from qilin_jax.train.metrics import head_tokens
from qilin_jax.train.optim import combine, make_optimizer
from qilin_jax.train.state import init_params, init_stage_state, model_parts
from qilin_jax.train.step import compile_train_step


def _batches(cfg, n, B=8, T=40, seed=0, answer_tokens=None):
    rng = np.random.default_rng(seed)
    P_, img = cfg.image_tokens, cfg.image_token_id
    out = []
    for _ in range(n):
        ids = rng.integers(3, cfg.text.vocab_size, size=(B, T)).astype(np.int32)
        mask = np.ones((B, T), np.int32)
        for b in range(B):
            ids[b, 2 : 2 + P_] = img
            mask[b, T - rng.integers(0, 8) :] = 0
        ids = np.where(mask == 1, ids, 0)
        labels = np.where((mask == 1) & (ids != img), ids, -100).astype(np.int32)
        if answer_tokens is not None:  # supervise only a short answer span per row
            for b in range(B):
                end = int(mask[b].sum())
                labels[b, : end - answer_tokens[b % len(answer_tokens)]] = -100
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        px = rng.normal(size=(B, 1, 3, 32, 32)).astype(np.float32)
        batch = dict(input_ids=ids, labels=labels, segment_ids=mask, position_ids=pos, pixel_values=px)
        out.append({k: v[None] for k, v in batch.items()})  # one micro-batch
    return out


def _run(mesh_shape, cfg, stage, batches):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = S.make_mesh(*mesh_shape, devices=devices)
    rules = S.DEFAULT_RULES
    parts = model_parts(cfg, mesh, rules)
    params = init_params(parts, 0, None, mesh, rules)
    tx, schedule = make_optimizer(stage, 10)
    state, frozen, state_sh, f_sh = init_stage_state(parts, params, stage.trainable, tx, mesh)
    b_sh = batch_shardings(mesh, rules, batches[0])
    step = compile_train_step(
        parts.graphdef, tx, schedule, state_shardings=state_sh, frozen_shardings=f_sh, batch_shardings=b_sh
    )
    losses = []
    for b in batches:
        with S.activation_sharding(mesh, rules):
            state, m = step(state, frozen, to_global(b, b_sh))
        losses.append(float(m["loss"]))
    # Parameters really are distributed as the rules say.
    q = state.trainable["llm"]["layers"]["q_proj"] if "llm" in state.trainable else None
    return losses, jax.device_get(combine(state.trainable, frozen)), q, mesh


CFG = model_preset("tiny")
STAGE = StageConfig(name="s2", trainable=["llm/.*", "adapter/.*"], learning_rate=1e-3, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def reference():
    batches = _batches(CFG, 3)
    losses, params, _, _ = _run((1, 1, 1), CFG, STAGE, batches)
    return batches, losses, params


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1), (1, 4, 2)])
def test_mesh_equals_one_device(mesh_shape, reference):
    batches, ref_losses, ref_params = reference
    losses, params, q, mesh = _run(mesh_shape, CFG, STAGE, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, want in flat_ref:
        got = flat[path]
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
        assert err <= 1e-5, (path, err)
    # q_proj [layers, embed, heads]: embed over fsdp, heads over tensor.
    spec = q.sharding.spec
    assert spec[1] == ("fsdp" if mesh.shape["fsdp"] > 1 else None)
    assert spec[2] == ("tensor" if mesh.shape["tensor"] > 1 else None)
    assert len(q.sharding.device_set) == 8


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_supervised_only_loss_on_a_mesh_equals_every_position(mesh_shape):
    """loss_supervised_only (the LM head on gathered supervised positions, budget picked on
    device) on a sharded mesh trains exactly like the every-position loss on one device,
    for short answers (a gathered branch) and a long one (the every-position branch)."""
    import dataclasses

    batches = _batches(CFG, 2, answer_tokens=[3, 5, 1, 4]) + _batches(CFG, 1, seed=1)
    ref_losses, ref_params, _, _ = _run((1, 1, 1), CFG, STAGE, batches)
    cfg = dataclasses.replace(CFG, loss_supervised_only=True)
    losses, params, _, _ = _run(mesh_shape, cfg, STAGE, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for path, want in jax.tree_util.tree_leaves_with_path(ref_params):
        got = dict(jax.tree_util.tree_leaves_with_path(params))[path]
        assert np.linalg.norm(got - want) <= 1e-5 * max(np.linalg.norm(want), 1e-12), path
    supervised = (batches[0]["labels"][0][:, 1:] != -100).sum()
    assert head_tokens(cfg, {"labels": batches[0]["labels"][0]}, 2) == 2 * supervised
    assert head_tokens(CFG, {"labels": batches[0]["labels"][0]}) is None
