"""One stage-1 and one stage-2 optimizer run equal to the same steps in PyTorch (HF llava,
torch AdamW, HF get_cosine_schedule_with_warmup, clip_grad_norm_ 1.0)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters.mapping import convert_state, nested_to_flat
from qilin_jax.config import StageConfig
from qilin_jax.models import QilinMedVL, model_preset
from qilin_jax.train.optim import combine, make_optimizer, partition, trainable_mask, warmup_cosine
from qilin_jax.train.step import init_state, stack_micro, train_step
from tests import torch_ref as R


def test_schedule_equals_hf_step_by_step():
    for total, ratio in ((100, 0.03), (37, 0.1), (5, 0.03)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        warm = int(np.ceil(ratio * total))
        sched = transformers.get_cosine_schedule_with_warmup(opt, warm, total)
        ours = warmup_cosine(2e-5, total, ratio)
        for step in range(total):
            assert abs(float(ours(step)) - opt.param_groups[0]["lr"]) <= 1e-12 + 1e-6 * 2e-5, (total, step)
            opt.step()
            sched.step()


def _batch(cfg):
    P, img = cfg.image_tokens, cfg.image_token_id
    rows = [[1, 5, 6] + [img] * P + [7, 8, 9, 10, 11, 12], [1, 13] + [img] * P + [14, 15, 16]]
    T = max(map(len, rows))
    ids = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    labels = np.where((ids != img) & (mask == 1), ids, -100).astype(np.int32)
    labels[:, :2] = -100
    px = np.random.default_rng(0).normal(size=(2, 1, 3, 32, 32)).astype(np.float32)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return dict(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        segment_ids=mask,
        position_ids=pos,
        pixel_values=px,
        image_valid=np.ones((2, 1), np.int32),
    )


STAGES = {
    "stage1": (["adapter/.*"], ("multi_modal_projector",), 1e-3),
    "stage2": (["llm/.*", "adapter/.*"], ("multi_modal_projector", "language_model", "lm_head"), 2e-5),
}


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_steps_equal_torch(stage_name):
    patterns, torch_parts, lr = STAGES[stage_name]
    cfg = model_preset("tiny")
    cfg = dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size - 1)
    steps, total = 3, 10
    stage = StageConfig(name=stage_name, trainable=patterns, learning_rate=lr, warmup_ratio=0.1)
    batch = _batch(cfg)

    # --- torch reference
    tm = R.build("llava", cfg, seed=21)
    trainable_t = []
    for name, p in tm.named_parameters():
        p.requires_grad_(any(part in name for part in torch_parts))
        if p.requires_grad:
            trainable_t.append(p)
    opt = torch.optim.AdamW(trainable_t, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = transformers.get_cosine_schedule_with_warmup(opt, int(np.ceil(0.1 * total)), total)

    # --- ours, from the same weights
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    R.to_jax("llava", tm, model, cfg)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    mask = trainable_mask(params, patterns)
    trainable, frozen = partition(params, mask)
    tx, schedule = make_optimizer(stage, total)
    st = init_state(trainable, tx)
    jbatch = jax.tree.map(jnp.asarray, stack_micro(batch, 1))
    step = jax.jit(lambda s, f, b: train_step(graphdef, tx, schedule, s, f, b))

    t_in = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in batch.items()}
    for i in range(steps):
        out = tm(
            input_ids=t_in["input_ids"],
            attention_mask=t_in["attention_mask"],
            pixel_values=t_in["pixel_values"][:, 0],
            labels=t_in["labels"],
        )
        opt.zero_grad()
        out.loss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(trainable_t, 1.0)
        assert abs(float(schedule(i)) - opt.param_groups[0]["lr"]) <= 1e-6 * lr
        opt.step()
        sched.step()
        st, metrics = step(st, frozen, jbatch)
        assert R.rel_err(metrics["loss"], out.loss.item()) <= 1e-5, (i, float(metrics["loss"]), out.loss.item())
        assert R.rel_err(metrics["grad_norm"], float(tnorm)) <= 1e-4

    ref = convert_state(R.state_items(tm.state_dict()), cfg, "hf-llava-v5")
    ours = nested_to_flat(combine(jax.device_get(st.trainable), frozen))
    start = nested_to_flat(params)
    n_moved = 0
    for path, want in ref.items():
        got = np.asarray(ours[path])
        assert R.rel_err(got, want) <= 1e-5, (path, R.rel_err(got, want))
        is_trainable = any(__import__("re").fullmatch(p, path) for p in patterns)
        delta_ref = want - np.asarray(start[path])

        if not is_trainable:
            assert np.array_equal(got, np.asarray(start[path])), path  # frozen: bit-identical
        elif np.linalg.norm(delta_ref) > 0:
            pass
            n_moved += 1
            # The update itself (not just the parameter) agrees.
            assert R.rel_err(got - np.asarray(start[path]), delta_ref) <= 1e-3, path
    assert n_moved >= (4 if stage_name == "stage1" else 12), n_moved
    # Frozen parameters carry no optimizer state.
    n_state = sum(x.size for x in jax.tree.leaves(st.opt_state))
    n_train = sum(x.size for x in jax.tree.leaves(st.trainable))
    assert n_state <= 2 * n_train + 8
