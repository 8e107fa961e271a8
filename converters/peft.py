"""LoRA adapters between qilin-jax and PEFT (`adapter_config.json` + `adapter_model.safetensors`
on transformers' LlavaForConditionalGeneration), and `merge-lora`.

PEFT keys (what `peft.get_peft_model_state_dict` saves for a Llava model):
    base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight  [r, in]
    base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_B.weight  [out, r]
    base_model.model.model.multi_modal_projector.linear_1.weight  (modules_to_save)
Ours: `llm/layers/q_proj_lora_a` [L, in, r] = lora_A^T per layer, `_lora_b` [L, r, out] =
lora_B^T. The projector (trained in full beside the adapters in LLaVA's recipe) travels as
PEFT `modules_to_save`, so the PEFT model reproduces ours exactly. The original LLaVA code's
`non_lora_trainables.bin` (the projector, `base_model.model.` prefixed) is read too.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from converters.mapping import ConversionError

PEFT_LLM = "base_model.model.model.language_model.layers."
PEFT_PROJECTOR = "base_model.model.model.multi_modal_projector."
SUBMODULE = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PROJECTOR = {
    "linear_1.weight": ("adapter/linear_1", "T"),
    "linear_1.bias": ("adapter/linear_1_bias", "id"),
    "linear_2.weight": ("adapter/linear_2", "T"),
    "linear_2.bias": ("adapter/linear_2_bias", "id"),
}
# Also accepted on import: older transformers (language_model.model.*) and the original LLaVA
# code (model.layers.*, model.mm_projector.{0,2}).
_LLM_KEY = re.compile(
    r"^base_model\.model\.(?:model\.language_model\.|language_model\.model\.|model\.)"
    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$"
)
_PROJ_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.multi_modal_projector\.|multi_modal_projector\.|"
    r"model\.mm_projector\.)(?:modules_to_save\.default\.)?"
    r"(linear_1|linear_2|0|2)\.(weight|bias)$"
)
TARGET_REGEX = r".*language_model.*\.({})"


def peft_key(target: str, layer: int, which: str) -> str:
    """The PEFT adapter key of our adapter array (which: 'A' or 'B') of one layer."""
    return f"{PEFT_LLM}{layer}.{SUBMODULE[target]}.{target}.lora_{which}.weight"


def adapter_config(
    *,
    rank: int,
    alpha: float,
    targets,
    use_rslora: bool,
    dropout: float = 0.0,
    modules_to_save=None,
    base_model: str | None = None,
) -> dict:
    """A PEFT LoraConfig dict for LlavaForConditionalGeneration (LLM matrices only)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # A regex: a name list would also put adapters on the CLIP tower's q/k/v_proj.
        "target_modules": TARGET_REGEX.format("|".join(targets)),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
    }


def export_arrays(lora: dict, adapter: dict | None = None) -> dict[str, np.ndarray]:
    """PEFT tensors (torch layouts) from our `llm/layers` adapter arrays and, optionally, the
    adapter (projector) params for modules_to_save."""
    out = {}
    for name, arr in lora.items():
        if not name.endswith(("_lora_a", "_lora_b")):
            continue
        t, which = name[:-7], name[-1].upper()
        arr = np.asarray(arr)
        for layer in range(arr.shape[0]):
            out[peft_key(t, layer, which)] = np.ascontiguousarray(arr[layer].T)
    for key, (path, kind) in PROJECTOR.items():
        if adapter is not None:
            v = np.asarray(adapter[path.split("/")[1]])
            out[PEFT_PROJECTOR + key] = np.ascontiguousarray(v.T if kind == "T" else v)
    return out


def spec_of(lora: dict) -> dict:
    """{rank, alpha, targets, use_rslora} of our adapter arrays (alpha from the scaling)."""
    from qilin_jax.models import lora as L

    spec = L.spec_from_params(lora)
    if spec is None:
        raise ConversionError("the checkpoint has no LoRA adapters (llm/layers/*_lora_a)")
    s = float(np.asarray(lora[L.SCALING]).reshape(-1)[0])
    return {"rank": spec["rank"], "alpha": s * spec["rank"], "targets": spec["targets"], "use_rslora": False}


def read_peft(src, num_layers: int) -> tuple[dict, dict, dict]:
    """(our `llm/layers` adapter arrays incl. scaling/layer, adapter (projector) params or {},
    the adapter_config) of a PEFT adapter directory."""
    from converters.readers import file_infos
    from qilin_jax.models import lora as L

    src = Path(src)
    cfg_path = src / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src}: no adapter_config.json; is it a PEFT LoRA adapter directory?")
    conf = json.loads(cfg_path.read_text())
    if conf.get("peft_type", "LORA").upper() != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type {conf.get('peft_type')!r}; only LORA adapters load")
    for k in ("rank_pattern", "alpha_pattern"):
        if conf.get(k):
            raise ConversionError(f"{cfg_path}: {k} (per-module ranks/alphas) is not supported")
    if conf.get("use_dora"):
        raise ConversionError(f"{cfg_path}: DoRA adapters are not supported")
    if conf.get("bias", "none") != "none":
        raise ConversionError(f"{cfg_path}: bias={conf['bias']!r}; only bias='none' adapters load")
    files = [p for n in ("adapter_model.safetensors", "adapter_model.bin") if (p := src / n).is_file()]
    if not files:
        raise ConversionError(f"{src}: no adapter_model.safetensors / adapter_model.bin")
    extra = src / "non_lora_trainables.bin"
    infos = list(file_infos(files[0])) + (list(file_infos(extra)) if extra.is_file() else [])
    rank = int(conf["r"])
    per: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    adapter: dict = {}
    for info in infos:
        m = _LLM_KEY.match(info.key)
        if m:
            layer, t, which = int(m.group(1)), m.group(2), m.group(3)
            if t not in L.TARGETS:
                raise ConversionError(f"{files[0]}: {info.key}: no such decoder matrix {t!r}")
            per.setdefault((t, which), {})[layer] = info.read().astype(np.float32)
            continue
        m = _PROJ_KEY.match(info.key)
        if m:
            lin = {"0": "linear_1", "2": "linear_2"}.get(m.group(1), m.group(1))
            path, kind = PROJECTOR[f"{lin}.{m.group(2)}"]
            v = info.read().astype(np.float32)
            adapter[path.split("/")[1]] = v.T if kind == "T" else v
            continue
        raise ConversionError(f"{info.file}: tensor {info.key} is neither a LoRA weight of the LLM nor the projector")
    if not per:
        raise ConversionError(f"{files[0]}: no LoRA weights of the LLM's layers")
    out = {}
    for (t, which), layers in sorted(per.items()):
        if sorted(layers) != list(range(num_layers)):
            raise ConversionError(
                f"{files[0]}: {t} lora_{which} has layers {sorted(layers)}, the model has {num_layers}"
            )
        arr = np.stack([layers[i].T for i in range(num_layers)])
        if arr.shape[1 if which == "B" else 2] != rank:
            raise ConversionError(f"{files[0]}: {t} lora_{which} has rank {arr.shape}, adapter_config r={rank}")
        out[t + ("_lora_a" if which == "A" else "_lora_b")] = arr
    for t in {t for t, _ in per}:
        if (t, "A") not in per or (t, "B") not in per:
            raise ConversionError(f"{files[0]}: {t} has only one of lora_A / lora_B")
    alpha = float(conf.get("lora_alpha", rank))
    s = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
    out[L.SCALING] = np.full((num_layers,), s, np.float32)
    out[L.LAYER] = np.arange(num_layers, dtype=np.float32)
    return out, adapter, conf


def write_peft(dst: Path, tensors: dict[str, np.ndarray], conf: dict) -> list[str]:
    """Write adapter_model.safetensors + adapter_config.json into dst; returns the file names."""
    from safetensors.numpy import save_file

    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return ["adapter_model.safetensors", "adapter_config.json"]


def resolve_checkpoint(src) -> Path:
    """A checkpoint directory from a checkpoint or a run folder (its last finished stage)."""
    src = Path(src)
    if (src / "config.json").is_file() or (src / "params").is_dir():
        return src
    cfg = src / "config.yaml"
    if cfg.is_file():
        import yaml

        stages = [s.get("name") for s in (yaml.safe_load(cfg.read_text()) or {}).get("stages") or []]
        for name in reversed(stages):
            final = src / str(name) / "final"
            if (final / "config.json").is_file():
                return final
        raise ConversionError(f"{src}: a run folder with no finished stage (no <stage>/final)")
    raise ConversionError(f"{src}: neither a qilin-jax checkpoint (config.json + params/) nor a run folder")


def merge_lora(src, dst, *, overwrite: bool = False, log=print) -> dict:
    """Write the checkpoint of `src` (a checkpoint or run folder) with its LoRA adapters folded
    into the LLM's matrices: a plain checkpoint for every tool. Returns a report."""
    import jax
    from flax import nnx

    from qilin_jax.checkpoint import load_pretrained, save_pretrained
    from qilin_jax.models import lora as L

    ckpt = resolve_checkpoint(src)
    dst = Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; choose another --dst or pass --overwrite")
    model = load_pretrained(ckpt)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    lora = params["llm"]["layers"]
    if L.SCALING not in lora:
        raise ConversionError(f"{ckpt}: no LoRA adapters to merge")
    spec = spec_of({k: v for k, v in lora.items() if L.is_lora_path("llm/layers/" + k)})
    merged = jax.jit(L.merge)(params)
    save_pretrained(merged, model.config, dst, overwrite=overwrite)
    tok = ckpt / "tokenizer"
    if tok.is_dir():
        import shutil

        shutil.copytree(tok, dst / "tokenizer")
    log(f"wrote {dst}: {ckpt} with LoRA rank {spec['rank']} on {','.join(spec['targets'])} merged")
    return {"src": str(ckpt), "dst": str(dst), **spec}


def export_peft(src, dst, *, include_adapter: bool = True, overwrite: bool = False, log=print) -> dict:
    """Write the LoRA adapters of a checkpoint (or run folder) as a PEFT adapter directory
    (plus the projector as modules_to_save); returns a report."""
    from converters.orbax_io import ParamReader
    from qilin_jax.checkpoint import find_params_item, read_config, staged_dir
    from qilin_jax.models import lora as L

    ckpt = resolve_checkpoint(src)
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty; choose another --dst or pass --overwrite")
    cfg = read_config(ckpt)
    if cfg.adapter != "mlp2x_gelu" and include_adapter:
        raise ConversionError(f"{ckpt}: adapter {cfg.adapter!r}: HF llava has only the mlp2x_gelu projector")
    item, prefix, suffix = find_params_item(ckpt)
    reader = ParamReader(item, prefix, suffix)
    names = [n for n in reader.names if L.is_lora_path(n)]
    if not any(n.endswith("_lora_a") for n in names):
        raise ConversionError(f"{ckpt}: no LoRA adapters (llm/layers/*_lora_a) to export")
    lora = {n.split("/")[-1]: np.asarray(reader.read(n), np.float32) for n in names}
    adapter = (
        {p.split("/")[1]: np.asarray(reader.read(p), np.float32) for p, _ in PROJECTOR.values()}
        if include_adapter
        else None
    )
    spec = spec_of(lora)
    conf = adapter_config(**spec, modules_to_save=["multi_modal_projector"] if include_adapter else None)
    with staged_dir(dst) as tmp:
        files = write_peft(tmp, export_arrays(lora, adapter), conf)
    log(
        f"wrote {dst}: PEFT LoRA rank {spec['rank']} alpha {spec['alpha']:g} on "
        f"{','.join(spec['targets'])}" + (" + the projector (modules_to_save)" if include_adapter else "")
    )
    return {"files": files, **spec}
