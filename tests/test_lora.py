"""LoRA against `peft` on transformers' LlavaForConditionalGeneration (random weights, float32):
logits, gradients, three AdamW steps, PEFT import/export and merge-lora."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from converters import peft as CP
from converters.cli import main as cli
from converters.mapping import convert_state, load_into_model
from qilin_jax.checkpoint import load_pretrained, save_pretrained
from qilin_jax.models import QilinMedVL, model_preset
from qilin_jax.models import lora as L
from qilin_jax.train.optim import guarded_adamw, partition, trainable_mask
from qilin_jax.train.step import init_state, loss_terms, train_step
from tests import torch_ref as R

RANK, ALPHA = 4, 8.0
TARGETS = list(L.TARGETS)


def tiny_cfg():
    cfg = model_preset("tiny")
    return dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size - 1)


def lora_config(**kw):
    return peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=CP.TARGET_REGEX.format("|".join(TARGETS)), **kw
    )


def randomize_lora_(pm, seed=1):
    """Random nonzero A and B (a fresh PEFT B is zero, which would hide B's mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(cfg, base state dict, PEFT model with random adapters, its saved adapter dir, base dir)."""
    cfg = tiny_cfg()
    tm = R.build("llava", cfg, seed=5)
    base_sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    base_dir = tmp_path_factory.mktemp("base")
    tm.save_pretrained(base_dir)
    pm = peft.get_peft_model(tm, lora_config(modules_to_save=["multi_modal_projector"]))
    randomize_lora_(pm)
    with torch.no_grad():  # the projector copy trains in full: make it differ from the base's
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    pm.eval()
    peft_dir = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(peft_dir)
    return cfg, base_sd, pm, peft_dir, base_dir


def ours(cfg, base_sd, peft_dir):
    """Our model: the base weights through the converter tables, the adapters from PEFT's files."""
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, convert_state(R.state_items(base_sd), cfg, "hf-llava-v5"))
    L.add_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS)
    arrays, adapter, _ = CP.read_peft(peft_dir, cfg.text.num_hidden_layers)
    for k, v in arrays.items():
        getattr(model.llm.layers, k).set_value(jnp.asarray(v))
    for k, v in adapter.items():
        getattr(model.adapter, k).set_value(jnp.asarray(v))
    return model


def batch(cfg, seed=0):
    P = cfg.image_tokens
    rng = np.random.default_rng(seed)
    t = lambda n: list(rng.integers(3, 100, size=n))
    it = cfg.image_token_id
    rows = [[1] + t(2) + [it] * P + t(6), [1] + t(1) + [it] * P + t(3) + [it] * P + t(2)]
    T = max(map(len, rows))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    labels = np.where((mask == 1) & (ids != it), ids, -100)
    px = rng.normal(size=(3, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, mask, labels, px


def torch_out(pm, ids, mask, px, labels=None):
    return pm(
        input_ids=torch.from_numpy(ids),
        pixel_values=torch.from_numpy(px),
        attention_mask=torch.from_numpy(mask),
        labels=None if labels is None else torch.from_numpy(labels),
    )


def our_lora_grads_as_torch(cfg, grads):
    """Our adapter gradients under PEFT's keys (torch layouts)."""
    return CP.export_arrays(grads["llm"]["layers"])


def test_peft_key_names_and_logits(ref):
    cfg, base_sd, pm, peft_dir, _ = ref
    saved = json.loads((peft_dir / "adapter_config.json").read_text())
    assert saved["r"] == RANK
    model = ours(cfg, base_sd, peft_dir)
    # Every PEFT LoRA weight has our key form, and ours are exactly PEFT's (transposed).
    peft_sd = {k.replace(".default", ""): v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
    mine = CP.export_arrays(
        {
            k: np.asarray(getattr(model.llm.layers, k).get_value())
            for k in vars(model.llm.layers)
            if k.endswith(("_lora_a", "_lora_b"))
        }
    )
    assert set(mine) == set(peft_sd) and len(mine) == 2 * len(TARGETS) * cfg.text.num_hidden_layers
    for k in mine:
        np.testing.assert_array_equal(mine[k], peft_sd[k])
    ids, mask, _, px = batch(cfg)
    with torch.no_grad():
        want = torch_out(pm, ids, mask, px).logits.numpy()
    got = np.asarray(model(ids, px, mask).logits)
    valid = mask.astype(bool)
    err = R.rel_err(got[valid], want[valid])
    assert err <= 1e-5, err
    # Not the base model: the adapters change the logits well beyond the tolerance.
    with torch.no_grad(), pm.disable_adapter():
        base = torch_out(pm, ids, mask, px).logits.numpy()
    assert R.rel_err(base[valid], want[valid]) > 1e-2


def test_lora_gradients_match_peft(ref):
    cfg, base_sd, pm, peft_dir, _ = ref
    model = ours(cfg, base_sd, peft_dir)
    ids, mask, labels, px = batch(cfg, seed=1)
    pm.zero_grad()
    out = torch_out(pm, ids, mask, px, labels)
    out.loss.backward()
    tgrads = {k.replace(".default", ""): p.grad.numpy() for k, p in pm.named_parameters() if "lora_" in k}
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    mask_t = trainable_mask(params, L.trainable_patterns())
    trainable, frozen = partition(params, mask_t)
    assert set(trainable) == {"llm"} and all(k.endswith(("_lora_a", "_lora_b")) for k in trainable["llm"]["layers"])
    micro = {"input_ids": ids, "pixel_values": px, "labels": labels, "segment_ids": mask}
    (lsum, n), g = jax.value_and_grad(lambda t: loss_terms(graphdef, t, frozen, micro, packed=False), has_aux=True)(
        trainable
    )
    g = jax.tree.map(lambda x: x / n, g)
    assert abs(float(lsum / n) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    mine = our_lora_grads_as_torch(cfg, g)
    assert set(mine) == set(tgrads)
    worst = max(R.rel_err(mine[k], tgrads[k]) for k in mine)
    assert worst <= 1e-4, worst
    assert all(np.abs(v).max() > 0 for v in mine.values())


def test_three_adamw_steps_match_torch(ref):
    """LoRA + the projector in full at its own learning rate, three steps, vs torch AdamW with
    two param groups on the PEFT model: every trained weight within 1e-5, the base unchanged."""
    cfg, base_sd, pm_ref, peft_dir, _ = ref
    lr, proj_lr, wd = 1e-3, 1e-4, 0.01
    tm = R.build("llava", cfg, seed=5)
    tm.load_state_dict(base_sd)
    pm = peft.get_peft_model(tm, lora_config(modules_to_save=["multi_modal_projector"]))
    pm.load_state_dict(pm_ref.state_dict())
    pm.train()  # dropout is 0: train mode only matters for modules_to_save bookkeeping
    lora_p = [p for k, p in pm.named_parameters() if p.requires_grad and "lora_" in k]
    proj_p = [p for k, p in pm.named_parameters() if p.requires_grad and "modules_to_save" in k]
    assert len(lora_p) == 2 * len(TARGETS) * cfg.text.num_hidden_layers and len(proj_p) == 4
    assert len(lora_p) + len(proj_p) == sum(p.requires_grad for p in pm.parameters())
    opt = torch.optim.AdamW(
        [{"params": lora_p, "lr": lr}, {"params": proj_p, "lr": proj_lr}], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd
    )
    batches = [batch(cfg, seed=s) for s in (2, 3, 4)]
    for ids, mask, labels, px in batches:
        opt.zero_grad()
        torch_out(pm, ids, mask, px, labels).loss.backward()
        opt.step()

    model = ours(cfg, base_sd, peft_dir)
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    patterns = L.trainable_patterns() + ["adapter/.*"]
    trainable, frozen = partition(params, trainable_mask(params, patterns))
    frozen0 = jax.tree.map(np.array, frozen)
    tx = guarded_adamw(
        lambda step: lr,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=wd,
        max_grad_norm=0,
        lr_scales=[("adapter/.*", proj_lr / lr)],
    )
    st = init_state(trainable, tx)
    step = jax.jit(lambda s, f, b: train_step(graphdef, tx, lambda c: lr, s, f, b))
    for ids, mask, labels, px in batches:
        b = {"input_ids": ids[None], "pixel_values": px[None], "labels": labels[None], "segment_ids": mask[None]}
        st, m = step(st, frozen, b)
        assert bool(m["finite"])
    got = CP.export_arrays(st.trainable["llm"]["layers"], st.trainable["adapter"])
    want = {
        k.replace(".default", "").replace("modules_to_save.", ""): p.detach().numpy()
        for k, p in pm.named_parameters()
        if p.requires_grad
    }
    assert set(got) == set(want)
    errs = {k: R.rel_err(got[k], want[k]) for k in got}
    assert max(errs.values()) <= 1e-5, max(errs.items(), key=lambda kv: kv[1])
    moved = {k: R.rel_err(got[k], CP.export_arrays(params["llm"]["layers"], params["adapter"])[k]) for k in got}
    assert min(moved.values()) > 1e-4  # every trained weight moved
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen0)  # the base: bit-identical
    for k, v in pm.state_dict().items():  # and torch's base too (sanity of the reference)
        if "lora_" not in k and "modules_to_save" not in k:
            kk = k.replace("base_model.model.", "").replace("base_layer.", "").replace("original_module.", "")
            np.testing.assert_array_equal(v.numpy(), base_sd[kk].numpy())


def test_dropout_deterministic_and_off_in_eval(ref):
    cfg, base_sd, _, peft_dir, _ = ref
    model = ours(cfg, base_sd, peft_dir)
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    trainable, frozen = partition(params, trainable_mask(params, L.trainable_patterns()))
    ids, mask, labels, px = batch(cfg)
    micro = {"input_ids": ids, "pixel_values": px, "labels": labels, "segment_ids": mask}
    f = jax.jit(
        lambda rng, rate: loss_terms(graphdef, trainable, frozen, micro, packed=False, rng=rng, lora_dropout=rate)[0],
        static_argnums=1,
    )
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    plain = float(f(k1, 0.0))
    a, a2, b = float(f(k1, 0.3)), float(f(k1, 0.3)), float(f(k2, 0.3))
    assert a == a2 and a != b and a != plain
    # Outside the train step's scope there is no dropout (evaluation, inference).
    out = model(ids, px, mask, labels=labels)
    assert abs(float(out.loss * out.num_tokens) - plain) <= 1e-5 * abs(plain)


def test_export_merge_and_import_through_the_cli(ref, tmp_path):
    cfg, base_sd, pm, peft_dir, base_dir = ref
    model = ours(cfg, base_sd, peft_dir)
    ids, mask, _, px = batch(cfg, seed=5)
    valid = mask.astype(bool)
    want = np.asarray(model(ids, px, mask).logits)

    ck = tmp_path / "ck"
    save_pretrained(model, cfg, ck)
    loaded = load_pretrained(ck)  # the adapters are part of the checkpoint
    assert L.has_lora_module(loaded.llm.layers)
    np.testing.assert_array_equal(np.asarray(loaded(ids, px, mask).logits), want)

    # merge-lora: a plain checkpoint with the same logits.
    assert cli(["merge-lora", "--src", str(ck), "--dst", str(tmp_path / "merged")]) == 0
    merged = load_pretrained(tmp_path / "merged")
    assert not L.has_lora_module(merged.llm.layers)
    err = R.rel_err(np.asarray(merged(ids, px, mask).logits)[valid], want[valid])
    assert err <= 1e-5, err

    # A plain export would silently drop the adapters: refused, naming the two ways out.
    assert cli(["to-torch", "--src", str(ck), "--dst", str(tmp_path / "hf"), "--format", "hf-llava"]) == 2
    assert not (tmp_path / "hf").exists()

    # to-torch --format peft: PeftModel.from_pretrained on the base gives our logits.
    assert cli(["to-torch", "--src", str(ck), "--dst", str(tmp_path / "peft_out"), "--format", "peft"]) == 0
    tm = R.build("llava", cfg, seed=99)
    tm.load_state_dict(base_sd)
    back = peft.PeftModel.from_pretrained(tm, tmp_path / "peft_out").eval()
    with torch.no_grad():
        theirs = torch_out(back, ids, mask, px).logits.numpy()
    err = R.rel_err(want[valid], theirs[valid])
    assert err <= 1e-4, err

    # to-jax --src BASE --lora PEFT_DIR: adapters made in PyTorch load into ours.
    assert cli(["to-jax", "--src", str(base_dir), "--lora", str(peft_dir), "--dst", str(tmp_path / "imp")]) == 0
    imp = load_pretrained(tmp_path / "imp")
    assert L.has_lora_module(imp.llm.layers)
    with torch.no_grad():
        ref_logits = torch_out(pm, ids, mask, px).logits.numpy()
    err = R.rel_err(np.asarray(imp(ids, px, mask).logits)[valid], ref_logits[valid])
    assert err <= 1e-4, err


def test_peft_import_errors_name_the_problem(ref, tmp_path):
    cfg, _, _, peft_dir, _ = ref
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(CP.ConversionError, match="DoRA"):
        CP.read_peft(bad, cfg.text.num_hidden_layers)
    with pytest.raises(CP.ConversionError, match="has layers"):
        CP.read_peft(peft_dir, cfg.text.num_hidden_layers + 1)
    with pytest.raises(CP.ConversionError, match="no LoRA adapters to merge"):
        plain = tmp_path / "plain"
        save_pretrained(QilinMedVL(cfg, rngs=nnx.Rngs(0)), cfg, plain)
        CP.merge_lora(plain, tmp_path / "out")
