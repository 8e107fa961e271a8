"""The demo's pretrained backbones (qilin_jax/demo_data/pretrain_backbones.py): the script
learns on a shortened run, the shipped files match their checksums, and they load through the
real converter into the demo's model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qilin_jax.demo_data import pretrain_backbones as PB

SHIPPED = PB.DEFAULT_OUT


def test_shipped_backbones_match_their_manifest():
    manifest = PB.verify_backbones(SHIPPED)
    assert set(manifest["sha256"]) == {
        "clip_vit/config.json",
        "clip_vit/model.safetensors",
        "llama/config.json",
        "llama/model.safetensors",
    }
    total = sum((SHIPPED / n).stat().st_size for n in manifest["sha256"])
    assert total < 25e6, total
    # The pretraining reached what the demo needs: every head of the probe well above chance.
    probe = manifest["vision_probe_accuracy"]
    assert min(probe.values()) > 0.85, probe
    assert manifest["llm_loss"]["heldout"] < 1.0, manifest["llm_loss"]


def test_damaged_or_missing_backbone_file_is_named(tmp_path):
    root = tmp_path / "pretrained"
    shutil.copytree(SHIPPED, root)
    f = root / "clip_vit" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(PB.BackboneChecksumError, match=r"clip_vit/model\.safetensors: sha256"):
        PB.verify_backbones(root)
    (root / "llama" / "config.json").unlink()
    shutil.copy(SHIPPED / "clip_vit" / "model.safetensors", f)
    with pytest.raises(PB.BackboneChecksumError, match=r"llama/config\.json: listed in .* but missing"):
        PB.verify_backbones(root)
    (root / "manifest.json").unlink()
    with pytest.raises(PB.BackboneChecksumError, match="no checksum manifest"):
        PB.verify_backbones(root)


def test_shipped_backbones_load_through_the_converter(tmp_path):
    """to_jax (the path of the real CLIP + LLaMA-2) gives the demo's model: its shapes, the
    shipped tensors, and a vision tower whose features tell the findings apart."""
    import jax
    from safetensors.numpy import load_file

    from converters.to_jax import to_jax
    from qilin_jax.checkpoint import load_pretrained

    to_jax(SHIPPED / "llama", tmp_path / "ck", vision=SHIPPED / "clip_vit", log=lambda m: None)
    model = load_pretrained(str(tmp_path / "ck"))
    demo = PB.demo_model_config()
    for part in ("vision", "text"):
        assert getattr(model.config, part) == getattr(demo, part), part
    assert (model.config.image_token_id, model.config.vision_feature_layer) == (demo.image_token_id, -2)
    vis = load_file(str(SHIPPED / "clip_vit" / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(model.vision.layers.q_proj.get_value()[2]),
        vis["vision_model.encoder.layers.2.self_attn.q_proj.weight"].astype(np.float32).T,
    )
    llm = load_file(str(SHIPPED / "llama" / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(model.llm.embed_tokens.get_value()), llm["model.embed_tokens.weight"].astype(np.float32)
    )
    # A least-squares linear probe on the adapter's features (mean over the patch tokens) of
    # fresh images: the pretrained tower tells the lesion quadrants apart (0.99 here) and
    # counts far better than a random tower of the same shape (0.69 against 0.39).
    images, targets = PB.vision_set(7, "pretrain_vision_eval", 400, demo.vision.image_size)
    pixels = PB.normalize_batch(images)

    def probe(vision):
        feats = np.asarray(jax.jit(lambda p: vision(p, layer=-2)[:, 1:].mean(1))(pixels))
        x = np.concatenate([feats, np.ones((len(feats), 1))], 1)
        tr, te = slice(0, 300), slice(300, 400)
        scores = {}
        for name, col in (("count", 1), ("quadrant", 4)):
            y = np.eye(4)[targets[:, col]] if name == "count" else targets[:, col : col + 1].astype(float)
            keep = targets[:, col] >= 0
            w = np.linalg.lstsq(x[tr][keep[tr]], y[tr][keep[tr]], rcond=None)[0]
            pred = x[te] @ w
            pred = pred.argmax(1) if name == "count" else (pred[:, 0] > 0.5)
            truth = targets[te, col]
            scores[name] = float(np.mean((pred == truth)[keep[te]]))
        return scores

    from flax import nnx

    from qilin_jax.models.vit import VisionTransformer

    trained = probe(model.vision)
    random = probe(VisionTransformer(demo.vision, rngs=nnx.Rngs(0)))
    assert trained["quadrant"] > 0.95 and trained["quadrant"] > random["quadrant"] + 0.3, (trained, random)
    assert trained["count"] > random["count"] + 0.2, (trained, random)


def test_short_pretraining_learns_and_writes_verified_hf_checkpoints(tmp_path):
    """A shortened run: the ViT's probe rises above chance, the LM's loss drops, and the
    output is two HF checkpoints that transformers' config classes read, with a manifest
    that verifies."""
    from transformers import CLIPVisionConfig, LlamaConfig

    lines = []
    manifest = PB.pretrain(
        tmp_path / "out",
        vision_images=384,
        vision_steps=40,
        vision_batch=64,
        texts=150,
        llm_steps=25,
        llm_batch=8,
        log=lines.append,
    )
    probe = manifest["vision_probe_accuracy"]
    assert probe["modality"] > 0.5 and probe["kind"] > 0.5, probe  # chance 0.25 / ~0.33
    lm = manifest["llm_loss"]
    assert lm["last"] < lm["first"] - 2.0 and lm["heldout"] < lm["first"] - 2.0, lm
    assert PB.verify_backbones(tmp_path / "out") == json.loads((tmp_path / "out" / "manifest.json").read_text())
    vcfg = CLIPVisionConfig.from_pretrained(tmp_path / "out" / "clip_vit")
    tcfg = LlamaConfig.from_pretrained(tmp_path / "out" / "llama")
    demo = PB.demo_model_config()
    assert (vcfg.hidden_size, vcfg.patch_size, vcfg.num_hidden_layers) == (
        demo.vision.hidden_size,
        demo.vision.patch_size,
        demo.vision.num_hidden_layers,
    )
    assert (tcfg.vocab_size, tcfg.hidden_size) == (demo.text.vocab_size, demo.text.hidden_size)
    assert any("vision probe" in line for line in lines)


@pytest.mark.slow
def test_pretraining_is_deterministic(tmp_path):
    kw = dict(
        vision_images=128, vision_steps=3, vision_batch=32, texts=40, llm_steps=3, llm_batch=4, log=lambda m: None
    )
    a = PB.pretrain(tmp_path / "a", **kw)["sha256"]
    b = PB.pretrain(tmp_path / "b", **kw)["sha256"]
    assert a == b


def test_pretraining_data_is_not_demo_data(tmp_path):
    """The pretraining images and texts come from RNG streams of their own."""
    from qilin_jax.demo_data import make_demo

    ids = make_demo._SPLIT_ID
    own = {ids["pretrain_vision"], ids["pretrain_vision_eval"], ids["pretrain_text"]}
    assert len(own) == 3 and not own & {v for k, v in ids.items() if not k.startswith("pretrain")}
    img, tgt = PB.render_vision_sample(0, "pretrain_vision", 0, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and tgt.shape == (8,)


def test_finding_labels():
    case = {"modality": "us", "count": 2, "kind": "dark", "size": "大", "locations": ["左上", "右下"], "n_images": 1}
    assert PB.finding_labels(case).tolist() == [2, 2, 3, 2, 1, 0, 0, 1]
    case = {**case, "count": 0, "locations": [], "n_images": 3}
    assert PB.finding_labels(case).tolist() == [2, 0, 0, 0, -1, -1, -1, -1]
