"""Converters: every PyTorch checkpoint format in (logit parity), out (from_pretrained parity),
bit-exact round trips, errors, the restricted unpickler, and loading onto a mesh."""

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from converters import readers as RD
from converters.cli import main as cli
from converters.mapping import ConversionError
from qilin_jax.checkpoint import CheckpointError, load_pretrained, save_pretrained
from qilin_jax.models import model_preset
from tests import torch_ref as R

TOL = 1e-4


# --- fixtures: one random torch llava model, saved in every format ------------------------


def tiny_cfg(**kw):
    cfg = model_preset("tiny")
    return dataclasses.replace(cfg, image_token_id=cfg.text.vocab_size - 1, **kw)


@pytest.fixture(scope="module")
def ref():
    """(config, torch LlavaForConditionalGeneration, its state dict as float32 torch tensors)."""
    cfg = tiny_cfg()
    tm = R.build("llava", cfg, seed=11)
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    return cfg, tm, sd


def sub(sd, pattern, repl):
    """Keys matching `pattern` renamed with `repl` (others dropped)."""
    return {re.sub(pattern, repl, k): v for k, v in sd.items() if re.match(pattern, k)}


def llava_release_sd(sd, with_vision=False):
    """The original LLaVA layout (REFERENCE.md table), from the transformers 5 in-memory keys."""
    out = sub(sd, r"^model\.language_model\.", "model.")
    out["lm_head.weight"] = sd["lm_head.weight"]
    for a, b in (("linear_1", "0"), ("linear_2", "2")):
        for w in ("weight", "bias"):
            out[f"model.mm_projector.{b}.{w}"] = sd[f"model.multi_modal_projector.{a}.{w}"]
    if with_vision:
        out.update(sub(sd, r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."))
    return out


def release_config(cfg):
    t = cfg.text
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "mm_projector_type": cfg.adapter,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "torch_dtype": "bfloat16",
    }


def save_bin_shards(sd, d: Path, n_shards=2, dtype=torch.float32):
    """pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json via torch.save."""
    d.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k].to(dtype).contiguous() for k in keys[i::n_shards]}
        torch.save(part, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """Directories of the reference model in each source format."""
    cfg, tm, sd = ref
    root = tmp_path_factory.mktemp("src")
    out = {}
    # HF Llama (sharded safetensors + index), saved by transformers itself.
    llama = transformers.LlamaForCausalLM(R.hf_text_config(cfg))
    llama_sd = sub(sd, r"^model\.language_model\.", "model.")
    llama_sd["lm_head.weight"] = sd["lm_head.weight"]
    llama.load_state_dict(llama_sd, strict=True)
    llama.save_pretrained(root / "llama", max_shard_size="40KB")
    (root / "llama" / "tokenizer.model").write_bytes(b"fake sentencepiece")
    out["llama"] = root / "llama"
    # HF CLIPModel (vision_model.* + a text tower that must be ignored).
    clip_cfg = transformers.CLIPConfig(
        vision_config=R.hf_vision_config(cfg).to_dict(),
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        projection_dim=8,
    )
    clip = transformers.CLIPModel(clip_cfg)
    missing, _ = clip.load_state_dict(sub(sd, r"^model\.vision_tower\.", "vision_model."), strict=False)
    assert all(not k.startswith("vision_model.") for k in missing)
    clip.save_pretrained(root / "clip")
    out["clip"] = root / "clip"
    # Stage-1 mm_projector.bin.
    proj = {k: v for k, v in llava_release_sd(sd).items() if "mm_projector" in k}
    torch.save(proj, root / "mm_projector.bin")
    out["projector"] = root / "mm_projector.bin"
    # Original LLaVA / Qilin release: .bin shards + index, without / with the vision tower.
    for name, vis in (("release", False), ("release_vis", True)):
        rsd = llava_release_sd(sd, with_vision=vis)
        rsd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer to ignore
        save_bin_shards(rsd, root / name, n_shards=3)
        (root / name / "config.json").write_text(json.dumps(release_config(cfg)))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def hf_ref(tmp_path_factory):
    """An HF llava with a padded vocab (like llava-hf's 32064 with <image>=32000): text vocab
    192, image token 128, plus its saves in the old / 4.5x-new / 5.x-saved layouts."""
    base = model_preset("tiny")
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=192), image_token_id=128)
    tm = R.build("llava", cfg, seed=12)
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    root = tmp_path_factory.mktemp("hf")
    tm.save_pretrained(root / "v5saved")  # transformers 5.x writes its own layout
    conf = json.loads((root / "v5saved" / "config.json").read_text())
    np_sd = {k: v.numpy() for k, v in sd.items()}
    layouts = {
        "old": [
            (r"^model\.language_model\.", "language_model.model."),
            (r"^lm_head\.", "language_model.lm_head."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
            (r"^model\.vision_tower\.", "vision_tower.vision_model."),
        ],
        "new": [(r"^model\.vision_tower\.", "model.vision_tower.vision_model.")],
    }
    dirs = {"v5saved": root / "v5saved"}
    for name, rules in layouts.items():
        d = root / name
        d.mkdir()
        renamed = {}
        for k, v in np_sd.items():
            for a, b in rules:
                k2 = re.sub(a, b, k)
                if k2 != k:
                    k = k2
                    break
            renamed[k] = v
        save_file(renamed, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(conf))
        dirs[name] = d
    return cfg, tm, sd, dirs


# --- helpers ------------------------------------------------------------------------------


def batch(cfg, image_token, seed=0):
    """Two rows with one and two images (right padded) and their pixels."""
    P = cfg.image_tokens
    rng = np.random.default_rng(seed)
    t = lambda n: list(rng.integers(3, 100, size=n))  # noqa: E731  text ids below any image id
    rows = [[1] + t(2) + [image_token] * P + t(5), [1] + t(1) + [image_token] * P + t(2) + [image_token] * P + t(1)]
    T = max(map(len, rows))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    px = rng.normal(size=(3, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, mask, px


def torch_logits(tm, ids, mask, px):
    with torch.no_grad():
        return (
            tm(
                input_ids=torch.from_numpy(ids),
                pixel_values=torch.from_numpy(px),
                attention_mask=torch.from_numpy(mask),
            )
            .logits.float()
            .numpy()
        )


def check_logits(ckpt, tm, torch_image_token, seed=0):
    """rel error of load_pretrained(ckpt) logits vs the torch model on real tokens."""
    model = load_pretrained(ckpt)
    cfg = model.config
    ids, mask, px = batch(cfg, cfg.image_token_id, seed)
    tids = np.where(ids == cfg.image_token_id, torch_image_token, ids)
    ours = np.asarray(model(ids, px, mask).logits)
    ref = torch_logits(tm, tids, mask, px)
    valid = mask.astype(bool)
    err = R.rel_err(ours[valid], ref[valid])
    assert err <= TOL, err
    return err


def to_jax(*args):
    assert cli(["to-jax", *map(str, args)]) == 0


PARITY = {}


# --- readers --------------------------------------------------------------------------------


def test_readers_every_dtype_views_and_legacy(tmp_path):
    a = torch.randn(6, 5)
    sd = {
        "f32": a,
        "bf16": a.to(torch.bfloat16),
        "f16": a.half(),
        "T": a.t(),
        "slice": a[2:4],
        "col": a[:, 1],
        "scalar": torch.tensor(2.5),
        "i64": torch.arange(3),
    }
    want = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    torch.save(sd, tmp_path / "zip.bin")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    st = {k: v.clone().contiguous() for k, v in sd.items()}
    from safetensors.torch import save_file as save_st

    save_st(st, tmp_path / "x.safetensors")
    for f in ("zip.bin", "legacy.bin", "x.safetensors"):
        infos = {i.key: i for i in RD.file_infos(tmp_path / f)}
        assert set(infos) == set(sd), f
        for k, info in infos.items():
            x = info.read()
            assert x.shape == tuple(sd[k].shape), (f, k)
            assert (x.dtype == ml_dtypes.bfloat16) == (k == "bf16"), (f, k, x.dtype)
            np.testing.assert_array_equal(x.astype(np.float64), want[k].astype(np.float64), err_msg=f"{f} {k}")


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="refusing to load global"):
        RD.torch_infos(tmp_path / "evil.bin")
    assert not marker.exists()
    # Legacy (non-zip) pickles go through torch's weights_only loader, which refuses too.
    torch.save({"evil": Evil()}, tmp_path / "evil_legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(RD.CheckpointReadError, match="weights_only"):
        RD.torch_infos(tmp_path / "evil_legacy.bin")
    assert not marker.exists()
    # training_args.bin next to weights is never opened.
    d = tmp_path / "run"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    (d / "training_args.bin").write_bytes((tmp_path / "evil.bin").read_bytes())
    assert [p.name for p in RD.weight_files(d)] == ["pytorch_model.bin"]


# --- to-jax: logit parity per format ------------------------------------------------------


def test_hf_llama_plus_clipmodel_plus_projector(ref, files, tmp_path, capsys):
    cfg, tm, _ = ref
    assert len(list(files["llama"].glob("model-*.safetensors"))) > 1
    assert (files["llama"] / "model.safetensors.index.json").exists()
    with zipfile.ZipFile(files["projector"]) as z:
        assert any(n.endswith("data.pkl") for n in z.namelist())
    dst = tmp_path / "ck"
    to_jax("--src", files["llama"], "--vision", files["clip"], "--projector", files["projector"], "--dst", dst)
    out = capsys.readouterr().out
    assert "format hf-llama" in out and "format hf-clip" in out and "format mm-projector" in out
    assert "ignored" in out  # the CLIP text tower
    assert (dst / "tokenizer" / "tokenizer.model").exists()
    report = json.loads((dst / "conversion.json").read_text())
    assert report["parts"] == {"llm": "src", "vision": "vision", "adapter": "projector"}
    PARITY["hf-llama+hf-clip+mm-projector"] = check_logits(dst, tm, cfg.image_token_id)


def test_llava_release_bin_shards_with_separate_vision(ref, files, tmp_path, capsys):
    cfg, tm, _ = ref
    dst = tmp_path / "ck"
    to_jax("--src", files["release"], "--vision", files["clip"], "--dst", dst)
    assert "format llava" in capsys.readouterr().out
    PARITY["llava .bin shards + hf-clip"] = check_logits(dst, tm, cfg.image_token_id)


def test_llava_release_with_vision_inside_and_bf16_output(ref, files, tmp_path):
    cfg, tm, _ = ref
    dst = tmp_path / "ck"
    # The release config says nothing about the vision tower's heads: name the preset.
    to_jax("--src", files["release_vis"], "--dst", dst, "--preset", "tiny")
    PARITY["llava .bin shards with vision"] = check_logits(dst, tm, cfg.image_token_id)
    # bf16 storage: the same weights rounded once.
    dst16 = tmp_path / "ck16"
    to_jax("--src", files["release_vis"], "--dst", dst16, "--dtype", "bfloat16", "--preset", "tiny")
    a = load_pretrained(dst).llm.layers.q_proj.get_value()
    b = load_pretrained(dst16).llm.layers.q_proj.get_value()
    np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16), np.asarray(b).astype(ml_dtypes.bfloat16))


def test_missing_vision_and_random_adapter(ref, files, tmp_path, capsys):
    cfg, _, sd = ref
    # The release without a vision tower and no --vision: a clear error, nothing written.
    dst = tmp_path / "nope"
    assert cli(["to-jax", "--src", str(files["release"]), "--dst", str(dst)]) == 2
    assert "--vision" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.glob(".nope*"))
    # LLaMA + CLIP only: the adapter starts random (stage 1), with a notice.
    dst = tmp_path / "stage1"
    to_jax("--src", files["llama"], "--vision", files["clip"], "--dst", dst)
    assert "initialised at random" in capsys.readouterr().out
    m = load_pretrained(dst)
    w = np.asarray(m.adapter.linear_1.get_value())
    assert w.shape == (cfg.vision.hidden_size, cfg.text.hidden_size) and 0.01 < w.std() < 0.05
    np.testing.assert_array_equal(
        np.asarray(m.llm.embed_tokens.get_value()), sd["model.language_model.embed_tokens.weight"].numpy()
    )


@pytest.mark.parametrize("layout", ["old", "new", "v5saved"])
def test_hf_llava_layouts_padded_vocab(hf_ref, tmp_path, capsys, layout):
    cfg, tm, _, dirs = hf_ref
    dst = tmp_path / "ck"
    to_jax("--src", dirs[layout], "--dst", dst)
    fmt = {"old": "hf-llava-old", "new": "hf-llava", "v5saved": "hf-llava-v5-saved"}[layout]
    assert f"format {fmt}," in capsys.readouterr().out
    conf = json.loads((dst / "config.json").read_text())
    assert conf["text"]["vocab_size"] == 192 and conf["image_token_id"] == 128
    PARITY[f"hf llava {layout} layout (vocab 192, image 128)"] = check_logits(dst, tm, cfg.image_token_id)


# --- to-torch -------------------------------------------------------------------------------


def test_export_hf_llava_from_pretrained(ref, files, tmp_path):
    cfg, tm, _ = ref
    ck = tmp_path / "ck"
    to_jax("--src", files["release_vis"], "--dst", ck, "--preset", "tiny")
    out = tmp_path / "hf"
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    assert (
        cli(
            [
                "to-torch",
                "--src",
                str(ck),
                "--dst",
                str(out),
                "--format",
                "hf-llava",
                "--tokenizer",
                str(tok),
                "--max-shard-size",
                "60KB",
            ]
        )
        == 0
    )
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists()
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    hf = hf.float().eval()
    # The release vocab (128) has no room for image token 128: padded to 192 (as 32000 -> 32064).
    assert hf.config.text_config.vocab_size == 192 and hf.config.image_token_index == 128
    ids, mask, px = batch(cfg, 128)
    with torch.no_grad():
        got = hf(
            input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    ref_logits = torch_logits(tm, np.where(ids == 128, cfg.image_token_id, ids), mask, px)
    valid = mask.astype(bool)
    err = R.rel_err(got[valid][:, :128], ref_logits[valid])
    assert err <= TOL, err
    # The padded rows never win: their logit is the mean of the real ones.
    assert (got[valid][:, 128:] <= got[valid][:, :128].max(-1, keepdims=True)).all()
    PARITY["export hf-llava -> from_pretrained"] = err


def _tensors(d):
    out = {}
    for info in RD.checkpoint_infos(d):
        out[info.key] = info.read()
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_exact(ref, tmp_path, dtype):
    cfg, _, sd = ref
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    src = tmp_path / "src"
    rsd = llava_release_sd(sd, with_vision=True)
    save_bin_shards(rsd, src, n_shards=2, dtype=tdt)
    (src / "config.json").write_text(json.dumps(release_config(cfg)))
    ck = tmp_path / "ck"
    to_jax("--src", src, "--dst", ck, "--dtype", dtype, "--preset", "tiny")
    original = _tensors(src)
    for fmt, extra in (("llava", ["--bin"]), ("llava", []), ("hf-llava", [])):
        out = tmp_path / f"out-{fmt}-{len(extra)}"
        assert cli(["to-torch", "--src", str(ck), "--dst", str(out), "--format", fmt, *extra]) == 0
        back = _tensors(out)
        if fmt == "hf-llava":  # compare through the key tables' other layout
            back = {
                re.sub(r"^language_model\.model\.", "model.", k)
                .replace("language_model.lm_head", "lm_head")
                .replace("multi_modal_projector.linear_1", "model.mm_projector.0")
                .replace("multi_modal_projector.linear_2", "model.mm_projector.2")
                .replace("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."): v
                for k, v in back.items()
            }
            V = cfg.text.vocab_size
            back["model.embed_tokens.weight"] = back["model.embed_tokens.weight"][:V]
            back["lm_head.weight"] = back["lm_head.weight"][:V]
        assert set(back) == set(original), (fmt, set(back) ^ set(original))
        for k, v in original.items():
            assert back[k].dtype == v.dtype, (fmt, k, back[k].dtype)
            assert back[k].tobytes() == v.tobytes(), (fmt, k)
    # The .bin we write is what torch.load(weights_only=True) reads, mmap included.
    tl = torch.load(tmp_path / "out-llava-1" / "pytorch_model.bin", weights_only=True, mmap=True)
    w = rsd["model.layers.1.mlp.down_proj.weight"].to(tdt)
    assert torch.equal(tl["model.layers.1.mlp.down_proj.weight"], w)


def test_linear_adapter_through_llava_format(tmp_path):
    cfg = tiny_cfg(adapter="linear")
    from flax import nnx

    from qilin_jax.models import QilinMedVL

    model = QilinMedVL(cfg, rngs=nnx.Rngs(3))
    ck = tmp_path / "ck"
    save_pretrained(model, cfg, ck)
    assert cli(["to-torch", "--src", str(ck), "--dst", str(tmp_path / "hf"), "--format", "hf-llava"]) == 2
    out = tmp_path / "llava"
    assert cli(["to-torch", "--src", str(ck), "--dst", str(out), "--format", "llava"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["mm_projector_type"] == "linear" and conf["architectures"] == ["LlavaLlamaForCausalLM"]
    t = _tensors(out)
    assert "model.mm_projector.weight" in t and "model.mm_projector.0.weight" not in t
    back = tmp_path / "back"
    to_jax("--src", out, "--dst", back)
    m2 = load_pretrained(back)
    assert m2.config.adapter == "linear"
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(m2, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- errors ---------------------------------------------------------------------------------


def _release_variant(ref, tmp_path, edit):
    cfg, _, sd = ref
    rsd = llava_release_sd(sd)
    edit(rsd)
    d = tmp_path / "bad"
    save_bin_shards(rsd, d, n_shards=1)
    (d / "config.json").write_text(json.dumps(release_config(cfg)))
    return d


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "vocab_config", "vocab_preset"])
def test_errors_name_keys_and_write_nothing(ref, files, tmp_path, case):
    cfg = ref[0]
    preset = []
    if case == "missing":
        d = _release_variant(ref, tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
        want = r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"
    elif case == "unexpected":
        d = _release_variant(ref, tmp_path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
        want = r"model\.layers\.0\.mlp\.extra\.weight"
    elif case == "shape":

        def edit(s):
            s["model.layers.1.self_attn.o_proj.weight"] = torch.ones(64, 32)

        d = _release_variant(ref, tmp_path, edit)
        want = r"model\.layers\.1\.self_attn\.o_proj\.weight: shape \(64, 32\).*expects per-layer \(64, 64\)"
    elif case == "vocab_config":
        d = _release_variant(ref, tmp_path, lambda s: None)
        conf = release_config(cfg)
        conf["vocab_size"] = 32000
        (d / "config.json").write_text(json.dumps(conf))
        want = r"embed_tokens has 128 rows but config.json says vocab_size=32000.*55296"
    else:
        d = _release_variant(ref, tmp_path, lambda s: None)
        preset = ["--preset", "qilin_med_vl_13b"]
        want = r"vocab mismatch.*128 rows but the preset has text.vocab_size=32000.*55296"
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=want):
        from converters.to_jax import to_jax as convert

        convert(d, dst, vision=files["clip"], preset=preset[1] if preset else None, log=lambda *_: None)
    assert not dst.exists() and not list(tmp_path.glob(".out*"))


def test_load_pretrained_refuses_mismatched_config(ref, files, tmp_path):
    dst = tmp_path / "ck"
    to_jax("--src", files["release_vis"], "--dst", dst, "--preset", "tiny")
    conf = json.loads((dst / "config.json").read_text())
    conf["adapter"] = "linear"
    (dst / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="unexpected adapter/linear_2"):
        load_pretrained(dst)
    conf["adapter"] = "mlp2x_gelu"
    conf["text"]["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="llm/layers/gate_proj stored"):
        load_pretrained(dst)


# --- loading onto a mesh, training-style checkpoints --------------------------------------------


def test_load_pretrained_onto_mesh(ref, files, tmp_path):
    from flax import nnx
    from jax.sharding import NamedSharding

    from qilin_jax.sharding import make_mesh, spec_for

    assert jax.device_count() == 8
    dst = tmp_path / "ck"
    to_jax("--src", files["release_vis"], "--dst", dst, "--preset", "tiny")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = load_pretrained(dst, mesh=mesh)
    ref_model = load_pretrained(dst)
    state = nnx.state(model, nnx.Param)
    n_sharded = 0
    for (path, var), (_, rvar) in zip(
        jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        jax.tree_util.tree_leaves_with_path(
            nnx.state(ref_model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
        ),
    ):
        arr = var.get_value()
        want = NamedSharding(mesh, spec_for(var.get_metadata()["axes"], arr.shape, mesh))
        assert arr.sharding == want, (path, arr.sharding, want)
        # each device holds only its shard
        shard_shape = want.shard_shape(arr.shape)
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards), path
        n_sharded += shard_shape != arr.shape
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(rvar.get_value()))
    assert n_sharded >= 10
    # sharded model still computes the same logits
    cfg = model.config
    ids, mask, px = batch(cfg, cfg.image_token_id)
    np.testing.assert_allclose(
        np.asarray(model(ids, px, mask).logits), np.asarray(ref_model(ids, px, mask).logits), rtol=2e-5, atol=2e-5
    )


def test_training_step_layout_and_save_pretrained(ref, files, tmp_path):
    """A step dir with the params under state/params (next to optimizer state) and a config
    one level up loads; save_pretrained round-trips."""
    import orbax.checkpoint as ocp
    from flax import nnx

    src = tmp_path / "ck"
    to_jax("--src", files["release_vis"], "--dst", src, "--preset", "tiny")
    model = load_pretrained(src)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    run = tmp_path / "run"
    step = run / "100"
    step.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": {"lr": 1e-3}}))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(
        step / "state", args=ocp.args.PyTreeSave({"params": pure, "opt_state": {"mu": pure["adapter"]}, "step": 100})
    )
    m2 = load_pretrained(step)
    for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(nnx.state(m2, nnx.Param).to_pure_dict())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = save_pretrained(m2, m2.config, tmp_path / "again")
    m3 = load_pretrained(saved, dtype="bfloat16")
    assert m3.llm.embed_tokens.get_value().dtype == jax.numpy.bfloat16
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(m2, m2.config, saved)


def test_parity_summary():
    """Prints the measured relative errors (run with -s to see them)."""
    for k, v in PARITY.items():
        print(f"parity {k}: rel err {v:.2e}")
    assert all(v <= TOL for v in PARITY.values())


def test_blockwise_conversion_matches_whole(ref, files, tmp_path, monkeypatch):
    """Tiny chunks force many row blocks per tensor (the path big checkpoints take)."""
    import importlib

    from converters import orbax_io

    TJ = importlib.import_module("converters.to_jax")

    whole = tmp_path / "whole"
    to_jax("--src", files["llama"], "--vision", files["clip"], "--projector", files["projector"], "--dst", whole)
    monkeypatch.setattr(orbax_io, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(TJ, "BLOCK_BYTES", 1)
    blocks = tmp_path / "blocks"
    to_jax("--src", files["llama"], "--vision", files["clip"], "--projector", files["projector"], "--dst", blocks)
    z = json.loads((blocks / "params" / "llm.lm_head" / ".zarray").read_text())
    assert z["chunks"] != z["shape"]
    from flax import nnx

    a = nnx.state(load_pretrained(whole), nnx.Param).to_pure_dict()
    b = nnx.state(load_pretrained(blocks), nnx.Param).to_pure_dict()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Export in row blocks (with vocab padding, to .bin) == export whole.
    TT = importlib.import_module("converters.to_torch")
    args = ["to-torch", "--src", str(blocks), "--format", "hf-llava", "--bin"]
    assert cli(args + ["--dst", str(tmp_path / "e_whole")]) == 0
    monkeypatch.setattr(TT, "BLOCK_BYTES", 256)
    assert cli(args + ["--dst", str(tmp_path / "e_blocks")]) == 0
    e1, e2 = _tensors(tmp_path / "e_whole"), _tensors(tmp_path / "e_blocks")
    assert set(e1) == set(e2) and e1["language_model.lm_head.weight"].shape[0] == 192
    for k in e1:
        assert e1[k].tobytes() == e2[k].tobytes(), k


def test_model_config_from_run_config():
    from qilin_jax.checkpoint import model_config_from_dict

    cfg = model_config_from_dict(
        {
            "model": {
                "preset": "tiny",
                "overrides": {"text": {"vocab_size": 256}},
                "checkpoint": None,
                "tokenizer": "pkg:demo_data/tokenizer",
            }
        }
    )
    assert cfg.text.vocab_size == 256 and cfg.text.hidden_size == 64


def test_converters_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, converters.cli, converters.to_jax, converters.to_torch, converters.detect, "
        "converters.readers, qilin_jax.checkpoint; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_cli_module_entry_point(files):
    """`python -m converters` (the contract scripts call) runs and reports formats."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "converters", "inspect", "--src", str(files["release"])],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    assert "format llava, parts llm+adapter, llm 2 layers, vocab 128, adapter mlp2x_gelu" in out
    bad = subprocess.run(
        [sys.executable, "-m", "converters", "to-jax", "--src", str(files["release"]), "--dst", "/nonexistent/x"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert bad.returncode == 2 and "--vision" in bad.stderr


def test_staged_dir_replaces_only_on_success(tmp_path):
    """The write-then-rename of save_pretrained and both converters: a failed block leaves the
    old folder as it was and no temporary folder; a finished one replaces it whole."""
    from qilin_jax.checkpoint import staged_dir

    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_dir(dst) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    with staged_dir(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    with staged_dir(tmp_path / "deeper" / "fresh") as tmp:  # parents made
        (tmp / "a").write_text("a")
    assert (tmp_path / "deeper" / "fresh" / "a").read_text() == "a"
    with staged_dir(tmp_path / "other", create=False) as tmp:  # a non-writing process
        assert tmp is None
    assert not (tmp_path / "other").exists()
