"""Say what a PyTorch checkpoint is: its key format, the parts it holds, vocab, adapter kind,
layer counts, dtype; and infer the QilinConfig that fits it.

Shapes (hidden sizes, layer counts, vocab, patch size, image size) always come from the
tensors. What shapes cannot tell (head counts, norm eps, RoPE theta/scaling, positions, the
vision feature layer, the image token id) comes from a config.json when there is one: HF
LlamaConfig / CLIPConfig / CLIPVisionConfig / LlavaConfig, or the original LLaVA release's
config (LlamaConfig fields plus mm_projector_type, mm_vision_select_layer, ...). Without
one, LLaMA/CLIP conventions are assumed (head_dim 128 / 64) and reported as guesses.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

from converters import keys as K
from converters.mapping import ConversionError
from converters.readers import TensorInfo, dtype_name

# When several formats explain every key, the first listed wins (see `detect`).
FORMAT_PREFERENCE = (
    "hf-llava-old",
    "hf-llava",
    "hf-llava-v5",
    "hf-llava-v5-saved",
    "llava",
    "hf-llama",
    "hf-clip",
    "hf-clip-vision",
    "mm-projector",
)


@dataclasses.dataclass
class Found:
    """What `detect` found in one checkpoint."""

    source: str
    format: str
    adapter: str | None  # "mlp2x_gelu" / "linear" when adapter keys are present
    parts: tuple[str, ...]  # of "llm", "vision", "adapter"
    layers: dict[str, int]  # part -> layer count
    vocab_size: int | None
    has_lm_head: bool
    dtypes: dict[str, int]  # dtype name -> tensor count
    num_tensors: int
    num_bytes: int
    ignored: list[str]  # known buffers / foreign parts that are skipped
    hf_config: dict | None  # config.json next to the weights, if any

    def summary(self) -> str:
        """One line for the CLI report."""
        layers = ", ".join(f"{p} {n} layers" for p, n in self.layers.items())
        dt = "/".join(sorted(self.dtypes))
        bits = [f"format {self.format}", f"parts {'+'.join(self.parts) or 'none'}"]
        if layers:
            bits.append(layers)
        if self.vocab_size:
            bits.append(f"vocab {self.vocab_size}")
        if self.adapter:
            bits.append(f"adapter {self.adapter}")
        bits.append(f"{self.num_tensors} tensors, {self.num_bytes / 2**30:.2f} GiB {dt}")
        if self.ignored:
            bits.append(f"{len(self.ignored)} ignored (buffers / other towers)")
        return f"{self.source}: " + ", ".join(bits)


def _score(keys, fmt, adapter):
    rows = K.compile_table(fmt, adapter)
    matched = collections.Counter()
    unmatched = []
    for k in keys:
        m = K.match(k, rows)
        if m is None:
            unmatched.append(k)
        else:
            matched[m[3]] += 1
    return matched, unmatched


def load_hf_config(src) -> dict | None:
    """config.json next to the weights (a dir, or the dir of a file), or None."""
    p = Path(src)
    p = p if p.is_dir() else p.parent
    f = p / "config.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise ConversionError(f"{f}: invalid JSON ({e})") from None
    return None


def is_llava_release_config(c: dict | None) -> bool:
    """Whether a config.json is the original LLaVA/Qilin release's (not HF llava's)."""
    return bool(c) and (
        "mm_projector_type" in c
        or "mm_vision_tower" in c
        or "mm_hidden_size" in c
        or "LlavaLlamaForCausalLM" in (c.get("architectures") or [])
    )


def detect(infos: list[TensorInfo], source: str = "", hf_config: dict | None = None) -> Found:
    """The format and contents of a checkpoint from its tensor list (no data is read)."""
    keys = [i.key for i in infos if not K.is_ignored(i.key)]
    ignored = [i.key for i in infos if K.is_ignored(i.key)]
    if not keys:
        raise ConversionError(f"{source}: no model tensors found (only {len(ignored)} buffers)")
    best = None
    for fmt in FORMAT_PREFERENCE:
        for adapter in ("mlp2x_gelu",) if fmt.startswith("hf-llava") else ("mlp2x_gelu", "linear"):
            matched, unmatched = _score(keys, fmt, adapter)
            cand = (len(unmatched), -sum(matched.values()), fmt, adapter, matched, unmatched)
            if best is None or cand[:2] < best[:2]:
                best = cand
    n_unmatched, _, fmt, adapter, matched, unmatched = best
    if n_unmatched:
        shown = ", ".join(unmatched[:8]) + (f" (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
        if any("lora_" in k for k in unmatched):
            raise ConversionError(
                f"{source}: LoRA weights ({shown}); merge them into the base "
                "model first (LLaVA: scripts/merge_lora_weights.py), then convert"
            )
        raise ConversionError(
            f"{source}: {n_unmatched} key(s) fit no known format (closest: {fmt}, which explains "
            f"{sum(matched.values())} keys): {shown}. Known formats: {', '.join(K.FORMATS)} "
            "(see converters/keys.py)."
        )
    parts = [p for p in ("llm", "vision", "adapter") if matched.get(p)]
    if matched.get("lm_head") and "llm" not in parts:
        parts.insert(0, "llm")
    # Plain LLaMA keys are the same in the LLaVA release: the config tells them apart.
    if fmt == "llava" and parts == ["llm"] and not is_llava_release_config(hf_config):
        fmt = "hf-llama"
    if fmt == "llava" and parts == ["adapter"]:
        fmt = "mm-projector"
    rows = K.compile_table(fmt, adapter)
    layers: dict[str, set] = collections.defaultdict(set)
    vocab = None
    has_head = False
    for i in infos:
        m = K.match(i.key, rows)
        if m is None:
            continue
        path, layer, _, part = m
        if layer is not None:
            layers[path.split("/")[0]].add(layer)
        if path == "llm/embed_tokens":
            vocab = i.shape[0]
        if path == "llm/lm_head":
            has_head = True
            vocab = vocab or i.shape[0]
    dtypes = collections.Counter(dtype_name(i.dtype) for i in infos)
    return Found(
        source=source,
        format=fmt,
        adapter=adapter if "adapter" in parts else None,
        parts=tuple(parts),
        layers={p: max(v) + 1 for p, v in sorted(layers.items())},
        vocab_size=vocab,
        has_lm_head=has_head,
        dtypes=dict(dtypes),
        num_tensors=len(infos),
        num_bytes=sum(i.nbytes for i in infos),
        ignored=ignored,
        hf_config=hf_config,
    )


# --- config inference -----------------------------------------------------------------------


def _shape_of(infos, fmt, adapter, path, layer=0):
    rows = K.compile_table(fmt, adapter or "mlp2x_gelu")
    for i in infos:
        m = K.match(i.key, rows)
        if m and m[0] == path and (m[1] is None or m[1] == layer):
            return i.shape
    return None


def _text_section(c: dict | None) -> dict:
    if not c:
        return {}
    if isinstance(c.get("text_config"), dict):
        return c["text_config"]
    if c.get("model_type") in ("clip", "clip_vision_model"):
        return {}
    return c


def _vision_section(c: dict | None) -> dict:
    if not c:
        return {}
    if isinstance(c.get("vision_config"), dict):
        return c["vision_config"]
    if isinstance(c.get("mm_vision_config"), dict):  # written by our llava-layout export
        return c["mm_vision_config"]
    if c.get("model_type") == "clip_vision_model":
        return c
    return {}


def _rope(t: dict):
    """(rope_theta, rope_scaling) from an HF Llama config (4.x fields or 5.x rope_parameters)."""
    params = t.get("rope_parameters") if isinstance(t.get("rope_parameters"), dict) else {}
    theta = params.get("rope_theta", t.get("rope_theta", 10000.0))
    scaling = t.get("rope_scaling")
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("rope_theta", None)
        if scaling.get("rope_type") == "default":
            scaling = None
    return float(theta), scaling


def infer_text(infos, found: Found, hf: dict | None, notices: list[str]):
    """TextConfig fields for the LLM tensors of `infos` (shapes) and config `hf` (the rest)."""
    from qilin_jax.models.configs import TextConfig

    t = _text_section(hf)
    fmt, ad = found.format, found.adapter
    V, D = _shape_of(infos, fmt, ad, "llm/embed_tokens")
    q = _shape_of(infos, fmt, ad, "llm/layers/q_proj")
    k = _shape_of(infos, fmt, ad, "llm/layers/k_proj")
    g = _shape_of(infos, fmt, ad, "llm/layers/gate_proj")
    if "num_attention_heads" in t:
        H = int(t["num_attention_heads"])
    elif q[0] % 64 == 0:
        hd_guess = 128 if q[0] % 128 == 0 else 64
        H = q[0] // hd_guess
        notices.append(
            f"no num_attention_heads in a config.json: assuming head_dim {hd_guess} "
            f"-> {H} heads (LLaMA convention); pass --preset to be explicit"
        )
    else:
        raise ConversionError(
            f"{found.source}: no config.json gives num_attention_heads and the "
            f"{q[0]}-wide attention fits no usual head size; pass --preset NAME"
        )
    if q[0] % H:
        raise ConversionError(f"q_proj has {q[0]} rows, not a multiple of num_attention_heads={H}")
    hd = q[0] // H
    theta, scaling = _rope(t)
    tie = bool(t.get("tie_word_embeddings", (hf or {}).get("tie_word_embeddings", False)))
    if not found.has_lm_head and not tie:
        raise ConversionError(
            f"{found.source}: no lm_head.weight and the config does not tie the "
            "word embeddings; the checkpoint is incomplete"
        )
    if "vocab_size" in t and int(t["vocab_size"]) != V:
        raise ConversionError(
            f"{found.source}: embed_tokens has {V} rows but config.json says vocab_size="
            f"{t['vocab_size']}. 32000 is LLaMA-2/FlagAlpha (the release), 55296 ymcui "
            "Chinese-LLaMA-2, 32064 HF llava (padded): fix the config.json or use the matching weights"
        )
    kw = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=g[0],
        num_hidden_layers=found.layers.get("llm", 0),
        num_attention_heads=H,
        num_key_value_heads=k[0] // hd,
        head_dim=hd,
        max_position_embeddings=int(t.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=tie,
    )
    for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = t.get(f)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            kw[f] = v
    if "rms_norm_eps" not in t:
        notices.append("no rms_norm_eps in a config.json: using 1e-5 (LLaMA-2)")
    return TextConfig(**kw)


def infer_vision(infos, found: Found, hf: dict | None, notices: list[str]):
    """VisionConfig fields for the vision tensors of `infos` and config `hf`."""
    from qilin_jax.models.configs import VisionConfig

    v = _vision_section(hf)
    fmt, ad = found.format, found.adapter
    D, C, p, _ = _shape_of(infos, fmt, ad, "vision/patch_embed")
    N = _shape_of(infos, fmt, ad, "vision/position_embedding")[0] - 1
    side = math.isqrt(N)
    if side * side != N:
        raise ConversionError(f"{found.source}: {N + 1} position embeddings are not 1 + a square grid of patches")
    fc1 = _shape_of(infos, fmt, ad, "vision/layers/fc1")
    if "num_attention_heads" in v:
        H = int(v["num_attention_heads"])
    elif D % 64 == 0:
        H = D // 64
        notices.append(
            f"no vision num_attention_heads in a config.json: assuming head_dim 64 -> {H} heads (CLIP convention)"
        )
    else:
        raise ConversionError(
            f"{found.source}: the vision tower is {D} wide and no config.json says "
            "how many heads it has; pass --preset NAME or --vision a CLIP dir "
            "with its config.json"
        )
    return VisionConfig(
        hidden_size=D,
        intermediate_size=fc1[0],
        num_hidden_layers=found.layers.get("vision", 0),
        num_attention_heads=H,
        num_channels=C,
        image_size=side * p,
        patch_size=p,
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )


def infer_config(llm: tuple, vision: tuple, adapter: tuple | None, notices: list[str]):
    """A QilinConfig from (infos, Found) of the LLM source, the vision source and the adapter
    source (None: the adapter will be initialised at random)."""
    from qilin_jax.models.configs import QilinConfig

    llm_infos, llm_found = llm
    vis_infos, vis_found = vision
    hf = llm_found.hf_config
    text = infer_text(llm_infos, llm_found, hf, notices)
    vis_cfg = vis_found.hf_config if vis_found.hf_config is not None else hf
    if vis_found is llm_found:
        vis_cfg = hf
    vision = infer_vision(vis_infos, vis_found, vis_cfg, notices)
    kw = {}
    release = is_llava_release_config(hf)
    if adapter is not None:
        kind = adapter[1].adapter
    elif release and hf.get("mm_projector_type") in ("linear", "mlp2x_gelu"):
        kind = hf["mm_projector_type"]
    else:
        kind = "mlp2x_gelu"
    if hf and hf.get("model_type") == "llava" and not release:  # HF LlavaConfig
        kw["image_token_id"] = int(hf.get("image_token_index", hf.get("image_token_id", text.vocab_size)))
        kw["vision_feature_layer"] = int(hf.get("vision_feature_layer", -2))
        kw["vision_feature_select_strategy"] = hf.get("vision_feature_select_strategy", "default")
        if hf.get("projector_hidden_act", "gelu") != "gelu":
            raise ConversionError(
                f"{llm_found.source}: projector_hidden_act {hf['projector_hidden_act']!r} is not supported (only gelu)"
            )
    else:
        kw["image_token_id"] = text.vocab_size
        if release:
            kw["vision_feature_layer"] = int(hf.get("mm_vision_select_layer", -2))
            feat = hf.get("mm_vision_select_feature", "patch")
            if feat not in ("patch", "cls_patch"):
                raise ConversionError(f"mm_vision_select_feature {feat!r} is not supported")
            kw["vision_feature_select_strategy"] = "default" if feat == "patch" else "full"
            if hf.get("mm_hidden_size") not in (None, vision.hidden_size):
                raise ConversionError(
                    f"{llm_found.source}: config.json mm_hidden_size="
                    f"{hf['mm_hidden_size']} but the vision tower is "
                    f"{vision.hidden_size} wide; is --vision the right CLIP?"
                )
    if isinstance(kw.get("vision_feature_layer"), list):
        raise ConversionError("multi-layer vision_feature_layer is not supported")
    return QilinConfig(vision=vision, text=text, adapter=kind, **kw)
