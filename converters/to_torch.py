"""A qilin-jax checkpoint -> PyTorch: HF `LlavaForConditionalGeneration` or the original LLaVA
layout (`LlavaLlamaForCausalLM`, which also covers the linear adapter).

Parameters are read from the Orbax checkpoint one layer at a time and written straight into
the output shards (safetensors, or torch zip `.bin` pickles with --bin), so memory stays
near one layer of one parameter.

HF llava keys are written in the pre-4.52 layout (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`): every transformers version
loads it (5.x renames on load). HF llava looks the image token up in the embedding table,
so when the image token id lies past the vocab (a 32000-vocab LLaMA, image token 32000) the
vocab is padded like llava-hf's 32064: new embedding rows are the mean embedding and new
lm_head rows the mean head row (whose logit never exceeds the best real token's); the first
`vocab_size` logits are unchanged.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from converters import keys as K
from converters.mapping import ConversionError, _layer_count, untransform
from converters.torch_writers import write_sharded

FORMATS = {"hf-llava": "hf-llava-old", "llava": "llava"}
PART_ORDER = {"llm": 0, "lm_head": 1, "vision": 2, "adapter": 3}
CLIP_ID = "openai/clip-vit-large-patch14-336"


def _out_dtype(name, stored):
    import ml_dtypes

    if name is None:
        return np.dtype(stored)
    table = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
    if name not in table:
        raise ConversionError(f"--dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def padded_vocab(cfg) -> int:
    """The HF llava vocab: the config's, or padded past the image token to a multiple of 64."""
    V = cfg.text.vocab_size
    if cfg.image_token_id < V:
        return V
    need = cfg.image_token_id + 2  # <image> and <pad>, as llava-hf adds them
    return -(-need // 64) * 64


def _plan(cfg, key_fmt: str, include_vision: bool):
    """[(key, path, layer, kind)] in a natural order: embeddings, layer by layer, norm, head."""
    rows = K.compile_table(key_fmt, cfg.adapter, cfg.text.tie_word_embeddings)
    out = []
    first_layer_row = {}
    for idx, (_, path, kind, part) in enumerate(rows):
        if kind == "tied" or (part == "vision" and not include_vision):
            continue
        n = _layer_count(path, cfg)
        if n is not None:
            first_layer_row.setdefault(part, idx)
        for layer in range(n) if n is not None else [None]:
            if layer is None:
                pos = -1 if idx < first_layer_row.get(part, 10**9) else 10**9
            else:
                pos = layer
            out.append(
                ((PART_ORDER[part], pos, idx), K.torch_key(path, layer, key_fmt, cfg.adapter), path, layer, kind)
            )
    out.sort(key=lambda e: e[0])
    return [e[1:] for e in out]


VOCAB_PARAMS = ("llm/embed_tokens", "llm/lm_head")
BLOCK_BYTES = 64 << 20


def _row_blocks(reader, path, kind, dt, pad_to=None):
    """Torch-layout row blocks of a 2-D parameter (read in slices, never whole); with pad_to,
    extra rows equal to the mean row (computed in a first pass) follow."""
    shape = reader.shape(path)
    rows = shape[0] if kind == "id" else shape[1]  # torch dim 0
    cols = shape[1] if kind == "id" else shape[0]
    step = max(1, BLOCK_BYTES // max(1, cols * 4))

    def block(a, b):
        x = reader.array(path)
        x = x[a:b] if kind == "id" else x[:, a:b]
        return untransform(np.asarray(x.read().result()), kind)

    mean = None
    if pad_to is not None and pad_to > rows:
        acc = np.zeros(cols, np.float64)
        for a in range(0, rows, step):
            acc += block(a, min(rows, a + step)).astype(np.float64).sum(0)
        mean = (acc / rows).astype(np.float32)
    for a in range(0, rows, step):
        yield np.ascontiguousarray(block(a, min(rows, a + step)).astype(dt, copy=False))
    if mean is not None:
        yield np.ascontiguousarray(np.repeat(mean[None], pad_to - rows, 0).astype(dt))


def hf_text_config(cfg, vocab: int, dtype: str) -> dict:
    """LlamaConfig fields of the LLM (loadable by transformers 4.x and 5.x)."""
    t = cfg.text
    d = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": t.rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    return d


def hf_vision_config(cfg) -> dict:
    """CLIPVisionConfig fields of the vision tower."""
    v = cfg.vision
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
        "projection_dim": 768,
        "attention_dropout": 0.0,
    }


def hf_llava_config(cfg, vocab: int, dtype: str) -> dict:
    """config.json of an HF LlavaForConditionalGeneration."""
    d = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "multimodal_projector_bias": True,
        "image_seq_length": cfg.vision.num_patches,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "text_config": hf_text_config(cfg, vocab, dtype),
        "vision_config": hf_vision_config(cfg),
        "torch_dtype": dtype,
    }
    if vocab > cfg.text.vocab_size:
        d["pad_token_id"] = cfg.image_token_id + 1
    return d


def llava_release_config(cfg, dtype: str) -> dict:
    """config.json in the original LLaVA-1.5 / Qilin-Med-VL release style."""
    d = hf_text_config(cfg, cfg.text.vocab_size, dtype)
    d.update(
        {
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": CLIP_ID,
            "mm_hidden_size": cfg.vision.hidden_size,
            "mm_projector_type": "linear" if cfg.adapter == "linear" else "mlp2x_gelu",
            "mm_vision_select_layer": cfg.vision_feature_layer,
            "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad",
            "use_mm_proj": True,
            "tune_mm_mlp_adapter": False,
            "freeze_mm_mlp_adapter": False,
            "mm_patch_merge_type": "flat",
            "max_length": cfg.text.max_position_embeddings,
            # Not read by LLaVA (it builds CLIP from mm_vision_tower); lets a converter rebuild
            # the vision config without guessing, e.g. for a non-standard vision tower.
            "mm_vision_config": hf_vision_config(cfg),
        }
    )
    return d


def _copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    from converters.to_jax import TOKENIZER_FILES

    if src is None:
        return []
    copied = []
    for cand in (src, src / "tokenizer"):
        for name in TOKENIZER_FILES:
            f = cand / name
            if f.is_file() and name not in copied:
                shutil.copy2(f, dst / name)
                copied.append(name)
    return copied


def to_torch(
    src,
    dst,
    *,
    format: str = "hf-llava",
    tokenizer=None,
    dtype: str | None = None,
    max_shard_size="5GB",
    bin: bool = False,
    include_vision: bool = True,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Export a qilin-jax checkpoint dir to PyTorch files in `dst`; returns a report dict."""
    from converters.orbax_io import ParamReader
    from qilin_jax.checkpoint import find_params_item, read_config, staged_dir

    t0 = time.time()
    if format not in FORMATS:
        raise ConversionError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    cfg = read_config(src)
    if format == "hf-llava" and cfg.adapter != "mlp2x_gelu":
        raise ConversionError(
            f"{src}: adapter {cfg.adapter!r}: HF llava has only the mlp2x_gelu projector; export with --format llava"
        )
    if format == "hf-llava" and not include_vision:
        raise ConversionError("HF llava checkpoints always hold the vision tower")
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; choose another --dst or pass --overwrite")
    item, prefix, suffix = find_params_item(src)
    reader = ParamReader(item, prefix, suffix)
    key_fmt = FORMATS[format]
    plan = _plan(cfg, key_fmt, include_vision)
    if any(n.endswith("_lora_a") for n in reader.names):
        raise ConversionError(
            f"{item}: the checkpoint carries LoRA adapters, which a {format} "
            "checkpoint cannot hold: fold them in first (python -m converters "
            "merge-lora) or export them with --format peft"
        )
    missing = sorted({p for _, p, _, _ in plan if p not in reader.names})
    if missing:
        raise ConversionError(f"{item}: parameter(s) {', '.join(missing)} missing from the checkpoint")

    V = cfg.text.vocab_size
    vocab = padded_vocab(cfg) if format == "hf-llava" else V
    entries, by_key = [], {}
    for key, path, layer, kind in plan:
        shape = reader.shape(path)
        if layer is not None:
            shape = shape[1:]
        tshape = untransform(np.empty(shape, np.uint8), kind).shape
        if vocab != V and path in ("llm/embed_tokens", "llm/lm_head"):
            tshape = (vocab,) + tuple(tshape[1:])
        dt = _out_dtype(dtype, reader.dtype(path))
        entries.append((key, tuple(tshape), dt))
        by_key[key] = (path, layer, kind, dt)
    dtypes = sorted({np.dtype(e[2]).name for e in entries})
    dtype_name = dtypes[0] if len(dtypes) == 1 else "float32"

    def produce(key):
        path, layer, kind, dt = by_key[key]
        shape = reader.shape(path)
        if layer is not None or kind not in ("id", "T") or len(shape) != 2:
            return np.ascontiguousarray(untransform(reader.read(path, layer), kind).astype(dt, copy=False))
        return _row_blocks(reader, path, kind, dt, pad_to=vocab if path in VOCAB_PARAMS else None)

    notices = []
    if vocab != V:
        notices.append(
            f"vocab padded {V} -> {vocab} for HF llava: image token {cfg.image_token_id}, "
            f"pad token {cfg.image_token_id + 1}; add '<image>' and '<pad>' to the tokenizer "
            "(tokenizer.add_tokens) if it does not have them"
        )
    with staged_dir(dst) as tmp:  # nothing is left at dst unless the whole write succeeds
        files = write_sharded(
            tmp, entries, produce, kind="bin" if bin else "safetensors", max_shard_size=max_shard_size
        )
        conf = (
            hf_llava_config(cfg, vocab, dtype_name) if format == "hf-llava" else llava_release_config(cfg, dtype_name)
        )
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        tok_src = (
            Path(tokenizer) if tokenizer else (Path(src) / "tokenizer" if (Path(src) / "tokenizer").is_dir() else None)
        )
        copied = _copy_tokenizer(tok_src, tmp)
    for n in notices:
        log(f"notice: {n}")
    total = sum(int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize for e in entries)
    secs = time.time() - t0
    log(
        f"wrote {dst}: {format} ({key_fmt} keys), {len(entries)} tensors in {len(files)} file(s), "
        f"{total / 2**30:.2f} GiB {'/'.join(dtypes)}, config.json"
        + (f", {len(copied)} tokenizer files" if copied else "")
        + f" in {secs:.1f}s"
    )
    return {
        "files": files,
        "tensors": len(entries),
        "bytes": total,
        "dtypes": dtypes,
        "vocab": vocab,
        "tokenizer_files": copied,
        "notices": notices,
        "seconds": round(secs, 2),
    }
