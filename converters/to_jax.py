"""PyTorch checkpoint(s) -> a qilin-jax checkpoint directory (`qilin_jax.load_pretrained`).

Sources combine: an LLM (HF Llama, or the LLaVA/Qilin release), a vision tower (in the same
checkpoint, or `--vision` a CLIP checkpoint), an adapter (in the same checkpoint, or
`--projector` a stage-1 mm_projector.bin; absent: initialised at random, the stage-1
starting point). Everything is checked from headers before any tensor is read; then each
tensor is read, transformed and written into its slot of the Orbax checkpoint (see
orbax_io), so memory stays near one tensor. The output is written to a temporary directory
next to `dst` and renamed at the end: nothing is left behind on failure.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from converters import detect as D
from converters import readers as R
from converters.mapping import ConversionError, expected_shapes, plan_state, transform

OUT_DTYPES = ("float32", "bfloat16")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclasses.dataclass
class Source:
    """One input checkpoint: its tensors (headers only) and what detect() found."""

    role: str
    path: str
    infos: list
    found: D.Found


def open_source(path, role: str) -> Source:
    """Read the headers of a checkpoint file/dir and detect its format."""
    infos = R.checkpoint_infos(path)
    found = D.detect(infos, str(path), D.load_hf_config(path))
    return Source(role, str(path), infos, found)


def _np_dtype(name: str):
    if name not in OUT_DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {name!r}")
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def assign_parts(main: Source, vision: Source | None, projector: Source | None, notices):
    """{part: Source}: explicit --vision/--projector win over what --src holds."""
    parts: dict[str, Source] = {}
    if "llm" not in main.found.parts:
        raise ConversionError(
            f"{main.path}: no LLM weights found (parts: "
            f"{', '.join(main.found.parts) or 'none'}); --src must be an LLM "
            "(HF Llama), a LLaVA/Qilin release or an HF llava checkpoint"
        )
    parts["llm"] = main
    if vision is not None:
        if "vision" not in vision.found.parts:
            raise ConversionError(
                f"{vision.path}: --vision holds no vision tower (found "
                f"{', '.join(vision.found.parts)}); pass a CLIP checkpoint dir"
            )
        if "vision" in main.found.parts:
            notices.append(f"--src also holds a vision tower; using the one from --vision {vision.path}")
        parts["vision"] = vision
    elif "vision" in main.found.parts:
        parts["vision"] = main
    else:
        raise ConversionError(
            f"{main.path}: no vision tower in this checkpoint (the LLaVA/Qilin release usually ships "
            "without it). Pass --vision DIR with the CLIP ViT-L/14-336 checkpoint "
            "(openai/clip-vit-large-patch14-336)."
        )
    if projector is not None:
        if "adapter" not in projector.found.parts:
            raise ConversionError(
                f"{projector.path}: --projector holds no adapter keys (model.mm_projector.* or multi_modal_projector.*)"
            )
        if "adapter" in main.found.parts:
            notices.append(f"--src also holds an adapter; using the one from --projector {projector.path}")
        parts["adapter"] = projector
    elif "adapter" in main.found.parts:
        parts["adapter"] = main
    return parts


def _check_preset(cfg, parts, notices):
    """With --preset the vocab and the adapter kind must match the checkpoint's."""
    llm = parts["llm"].found
    if llm.vocab_size is not None and llm.vocab_size != cfg.text.vocab_size:
        raise ConversionError(
            f"{llm.source}: vocab mismatch: the checkpoint's embed_tokens/lm_head have "
            f"{llm.vocab_size} rows but the preset has text.vocab_size={cfg.text.vocab_size}. "
            "32000 is LLaMA-2/FlagAlpha (the release: qilin_med_vl_13b), 55296 ymcui "
            "Chinese-LLaMA-2 (qilin_med_vl_13b_ymcui), 32064 HF llava (padded: convert without "
            "--preset, the config is read from its config.json)."
        )
    src = parts.get("adapter")
    if src is not None and src.found.adapter != cfg.adapter:
        raise ConversionError(
            f"{src.path}: the checkpoint's adapter is {src.found.adapter} but the "
            f"preset says adapter={cfg.adapter}; choose the matching preset"
        )


def _copy_tokenizer(sources, dst: Path) -> list[str]:
    copied = []
    for src in sources:
        d = Path(src)
        d = d if d.is_dir() else d.parent
        for cand in (d, d / "tokenizer"):
            for name in TOKENIZER_FILES:
                f = cand / name
                if f.is_file() and name not in copied:
                    (dst / "tokenizer").mkdir(exist_ok=True)
                    shutil.copy2(f, dst / "tokenizer" / name)
                    copied.append(name)
    return copied


def random_adapter(cfg, seed: int) -> dict[str, np.ndarray]:
    """Freshly initialised adapter parameters ('adapter/linear_1', ...) as the model inits them."""
    from flax import nnx

    from converters.mapping import nested_to_flat
    from qilin_jax.models.adapter import Adapter

    ad = Adapter(cfg.adapter, cfg.vision.hidden_size, cfg.text.hidden_size, rngs=nnx.Rngs(seed))
    flat = nested_to_flat(nnx.state(ad, nnx.Param).to_pure_dict())
    return {f"adapter/{k}": np.asarray(v) for k, v in flat.items()}


BLOCK_BYTES = 64 << 20


def convert_tensor(info, path, layer, kind, writer, out_dt) -> int:
    """Read, transform and write one source tensor; big 2-D ones in row blocks that cover
    whole output chunks (no read-modify-write), so memory stays near one block. Returns the
    bytes read."""
    if kind not in ("id", "T") or len(info.shape) != 2:
        x = info.read()
        writer.write(path, transform(x, kind).astype(out_dt, copy=False), layer)
        return x.nbytes
    rows, cols = info.shape
    axis = 0 if kind == "id" else 1  # where torch dim 0 lands in our layout
    chunk = writer.slot_chunks(path)[axis]
    per_chunk = chunk * cols * max(out_dt.itemsize, info.dtype.itemsize)
    step = chunk * max(1, BLOCK_BYTES // max(per_chunk, 1))
    total = 0
    for start in range(0, rows, step):
        x = info.read_rows(start, min(rows, start + step))
        writer.write(path, transform(x, kind).astype(out_dt, copy=False), layer, axis=axis, start=start)
        total += x.nbytes
        del x
    return total


def to_jax(
    src,
    dst,
    *,
    vision=None,
    projector=None,
    dtype: str = "float32",
    preset: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    log=print,
    lora: str | None = None,
) -> dict:
    """Convert PyTorch checkpoint(s) into a qilin-jax checkpoint dir; returns a report dict.
    `lora`: a PEFT LoRA adapter dir stored with the weights (and its projector, if it has one)."""
    from converters.orbax_io import ParamWriter
    from qilin_jax.checkpoint import PARAMS_ITEM, staged_dir, write_config
    from qilin_jax.models import model_preset

    t0 = time.time()
    out_dt = _np_dtype(dtype)
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; choose another --dst or pass --overwrite")
    notices: list[str] = []
    main = open_source(src, "src")
    vis = open_source(vision, "vision") if vision else None
    proj = open_source(projector, "projector") if projector else None
    sources = [s for s in (main, vis, proj) if s is not None]
    for s in sources:
        log(f"found [{s.role}] {s.found.summary()}")
    parts = assign_parts(main, vis, proj, notices)

    if preset:
        cfg = model_preset(preset)
        _check_preset(cfg, parts, notices)
    else:
        vsrc = parts["vision"]
        asrc = parts.get("adapter")
        cfg = D.infer_config(
            (main.infos, main.found), (vsrc.infos, vsrc.found), (asrc.infos, asrc.found) if asrc else None, notices
        )
    if "adapter" not in parts:
        notices.append(
            f"no adapter weights: the {cfg.adapter} adapter is initialised at random "
            f"(seed {seed}); that is the stage-1 starting point. Pass --projector "
            "mm_projector.bin to use trained adapter weights."
        )

    # Check every key and shape of every source before writing anything.
    plans = []
    for s in sources:
        mine = [p for p, owner in parts.items() if owner is s]
        if not mine:
            notices.append(f"{s.path}: nothing used from it")
            continue
        plan, skipped = plan_state(
            ((i.key, i.shape) for i in s.infos), cfg, s.found.format, parts=mine, skip_other_parts=True
        )
        if skipped:
            notices.append(
                f"{s.path}: skipped {len(skipped)} tensor(s) of parts taken from elsewhere (e.g. {skipped[0]})"
            )
        by_key = {i.key: i for i in s.infos}
        plans.append((s, [(by_key[k], path, layer, kind) for k, path, layer, kind in plan]))

    lora_arrays, lora_adapter = {}, {}
    if lora:
        from converters.peft import read_peft

        lora_arrays, lora_adapter, _ = read_peft(lora, cfg.text.num_hidden_layers)
        lora_arrays = {"llm/layers/" + k: v for k, v in lora_arrays.items()}
        for path, v in lora_arrays.items():
            if path.endswith(("_lora_a", "_lora_b")):
                base = expected_shapes(cfg)[path[:-7]]
                dims = (base[0], base[1]) if path.endswith("_lora_a") else (base[0], base[2])
                got = (v.shape[0], v.shape[1]) if path.endswith("_lora_a") else (v.shape[0], v.shape[2])
                if got != dims:
                    raise ConversionError(
                        f"{lora}: {path} has shape {v.shape}, which does not fit {path[:-7]} {base} of the model"
                    )
        if lora_adapter:
            notices.append(f"{lora}: the projector (modules_to_save) replaces the adapter of the base")

    for n in notices:
        log(f"notice: {n}")

    with staged_dir(dst) as tmp:  # nothing is left at dst unless the whole write succeeds
        shapes = expected_shapes(cfg)
        writer = ParamWriter(tmp / PARAMS_ITEM)
        for path, shape in shapes.items():
            writer.create(path, shape, out_dt, stacked="/layers/" in path)
        n_read = 0
        bytes_read = 0
        for _s, plan in plans:
            # Read in file order (and offset order within a file) for sequential disk access.
            for info, path, layer, kind in plan:
                bytes_read += convert_tensor(info, path, layer, kind, writer, out_dt)
                n_read += 1
        if "adapter" not in parts and not lora_adapter:
            for path, arr in random_adapter(cfg, seed).items():
                writer.write(path, arr)
        for name, arr in lora_adapter.items():
            writer.write("adapter/" + name, arr)
        for path, arr in lora_arrays.items():
            writer.create(path, arr.shape, out_dt, stacked=True)
            writer.write(path, arr)
        writer.close()
        write_config(cfg, tmp)
        copied = _copy_tokenizer([main.path] + ([vision] if vision else []), tmp)
        report = {
            "sources": {
                s.role: {
                    "path": s.path,
                    "format": s.found.format,
                    "parts": list(s.found.parts),
                    "dtypes": s.found.dtypes,
                    "tensors": s.found.num_tensors,
                }
                for s in sources
            },
            "parts": {p: s.role for p, s in parts.items()},
            "random_adapter": "adapter" not in parts,
            "dtype": dtype,
            "tensors_read": n_read,
            "bytes_read": bytes_read,
            "bytes_written": writer.bytes_written,
            "tokenizer_files": copied,
            "notices": notices,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    v, t = cfg.vision, cfg.text
    log(
        f"wrote {dst}: params/ ({writer.bytes_written / 2**30:.2f} GiB {dtype}), config.json "
        f"(vision {v.num_hidden_layers}x{v.hidden_size} {v.image_size}px/{v.patch_size}, "
        f"adapter {cfg.adapter}, llm {t.num_hidden_layers}x{t.hidden_size} heads "
        f"{t.num_attention_heads}/{t.num_key_value_heads} vocab {t.vocab_size}, image token "
        f"{cfg.image_token_id})"
        + (f", tokenizer/ ({len(copied)} files)" if copied else "")
        + f" in {report['seconds']:.1f}s"
    )
    return report
