"""Key tables: PyTorch checkpoint key -> qilin-jax parameter path + transform, as data.

A table row is (regex relative to a part's prefix, parameter path, transform). `(\\d+)` in
the regex is the layer index into the stacked `layers` parameters. Transforms:
  "id"   copy as is;
  "T"    transpose a torch Linear weight [out, in] -> kernel [in, out];
  "conv" torch conv weight [out, in, kh, kw] -> [kh, kw, in, out].
Each checkpoint format is a set of part prefixes over the same part tables.
"""

from __future__ import annotations

import re

LLM_TABLE = (
    (r"embed_tokens\.weight", "llm/embed_tokens", "id"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "llm/layers/attn_norm", "id"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.weight", "llm/layers/q_proj", "T"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.weight", "llm/layers/k_proj", "T"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.weight", "llm/layers/v_proj", "T"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", "llm/layers/o_proj", "T"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "llm/layers/mlp_norm", "id"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", "llm/layers/gate_proj", "T"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", "llm/layers/up_proj", "T"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", "llm/layers/down_proj", "T"),
    (r"norm\.weight", "llm/norm", "id"),
)

LM_HEAD_TABLE = ((r"weight", "llm/lm_head", "T"),)

VISION_TABLE = (
    (r"embeddings\.patch_embedding\.weight", "vision/patch_embed", "conv"),
    (r"embeddings\.class_embedding", "vision/class_embedding", "id"),
    (r"embeddings\.position_embedding\.weight", "vision/position_embedding", "id"),
    (r"pre_layrnorm\.weight", "vision/pre_ln_scale", "id"),
    (r"pre_layrnorm\.bias", "vision/pre_ln_bias", "id"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.weight", "vision/layers/ln1_scale", "id"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.bias", "vision/layers/ln1_bias", "id"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight", "vision/layers/q_proj", "T"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.bias", "vision/layers/q_bias", "id"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.weight", "vision/layers/k_proj", "T"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.bias", "vision/layers/k_bias", "id"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.weight", "vision/layers/v_proj", "T"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.bias", "vision/layers/v_bias", "id"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.weight", "vision/layers/o_proj", "T"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.bias", "vision/layers/o_bias", "id"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.weight", "vision/layers/ln2_scale", "id"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.bias", "vision/layers/ln2_bias", "id"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight", "vision/layers/fc1", "T"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.bias", "vision/layers/fc1_bias", "id"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.weight", "vision/layers/fc2", "T"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.bias", "vision/layers/fc2_bias", "id"),
    (r"post_layernorm\.weight", "vision/post_ln_scale", "id"),
    (r"post_layernorm\.bias", "vision/post_ln_bias", "id"),
)

# The adapter in the original LLaVA layout: nn.Sequential(Linear, GELU, Linear) or one Linear.
ADAPTER_SEQUENTIAL_TABLE = (
    (r"0\.weight", "adapter/linear_1", "T"),
    (r"0\.bias", "adapter/linear_1_bias", "id"),
    (r"2\.weight", "adapter/linear_2", "T"),
    (r"2\.bias", "adapter/linear_2_bias", "id"),
)
ADAPTER_LINEAR_TABLE = (
    (r"weight", "adapter/linear_1", "T"),
    (r"bias", "adapter/linear_1_bias", "id"),
)
ADAPTER_HF_TABLE = (
    (r"linear_1\.weight", "adapter/linear_1", "T"),
    (r"linear_1\.bias", "adapter/linear_1_bias", "id"),
    (r"linear_2\.weight", "adapter/linear_2", "T"),
    (r"linear_2\.bias", "adapter/linear_2_bias", "id"),
)

# Per format: part -> key prefix. "adapter" names its table too.
FORMATS: dict[str, dict[str, str]] = {
    # The original LLaVA / Qilin-Med-VL release (LlavaLlamaForCausalLM).
    "llava": {
        "llm": "model.",
        "lm_head": "lm_head.",
        "adapter": "model.mm_projector.",
        "vision": "model.vision_tower.vision_tower.vision_model.",
    },
    # transformers LlavaForConditionalGeneration, layout before transformers 4.52.
    "hf-llava-old": {
        "llm": "language_model.model.",
        "lm_head": "language_model.lm_head.",
        "adapter": "multi_modal_projector.",
        "vision": "vision_tower.vision_model.",
    },
    # transformers LlavaForConditionalGeneration, current layout.
    "hf-llava": {
        "llm": "model.language_model.",
        "lm_head": "lm_head.",
        "adapter": "model.multi_modal_projector.",
        "vision": "model.vision_tower.vision_model.",
    },
    # transformers 5.x LlavaForConditionalGeneration in memory (its state_dict()).
    "hf-llava-v5": {
        "llm": "model.language_model.",
        "lm_head": "lm_head.",
        "adapter": "model.multi_modal_projector.",
        "vision": "model.vision_tower.",
    },
    # What transformers 5.x save_pretrained writes for llava: the old LLM/adapter prefixes but
    # a vision tower without `vision_model.`.
    "hf-llava-v5-saved": {
        "llm": "language_model.model.",
        "lm_head": "language_model.lm_head.",
        "adapter": "multi_modal_projector.",
        "vision": "vision_tower.",
    },
    # transformers LlamaForCausalLM (e.g. FlagAlpha/Llama2-Chinese-13b-Chat).
    "hf-llama": {"llm": "model.", "lm_head": "lm_head."},
    # transformers CLIPModel / CLIPVisionModel (e.g. openai/clip-vit-large-patch14-336).
    "hf-clip": {"vision": "vision_model."},
    # transformers 5.x CLIPVisionModel (no `vision_model.` prefix).
    "hf-clip-vision": {"vision": ""},
    # A stage-1 `mm_projector.bin`: {"model.mm_projector.0.weight": ...}.
    "mm-projector": {"adapter": "model.mm_projector."},
}

# Buffers and parts of other models that are not parameters of ours.
IGNORED = (
    r".*rotary_emb\.inv_freq$",
    r".*embeddings\.position_ids$",
    r"^text_model\..*",  # the CLIP text tower
    r"^(logit_scale|text_projection\.weight|visual_projection\.weight)$",
)


def adapter_table(fmt: str, adapter: str):
    """The adapter rows for a format and adapter kind."""
    if fmt.startswith("hf-llava"):
        if adapter != "mlp2x_gelu":
            raise ValueError("HF llava has no linear-adapter form; export a linear adapter with --format llava")
        return ADAPTER_HF_TABLE
    return ADAPTER_SEQUENTIAL_TABLE if adapter == "mlp2x_gelu" else ADAPTER_LINEAR_TABLE


def part_tables(fmt: str, adapter: str = "mlp2x_gelu", tie_word_embeddings: bool = False):
    """(part, prefix, rows) for every part a format holds."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {sorted(FORMATS)}")
    out = []
    for part, prefix in FORMATS[fmt].items():
        if part == "llm":
            rows = LLM_TABLE
        elif part == "lm_head":
            # A tied head is the embedding: its key may be present (torch state dicts list
            # tied tensors twice) and is skipped.
            rows = tuple((p, path, "tied") for p, path, _ in LM_HEAD_TABLE) if tie_word_embeddings else LM_HEAD_TABLE
        elif part == "vision":
            rows = VISION_TABLE
        else:
            rows = adapter_table(fmt, adapter)
        out.append((part, prefix, rows))
    return out


def compile_table(fmt: str, adapter: str = "mlp2x_gelu", tie_word_embeddings: bool = False, parts=None):
    """Compiled rows (regex, path, transform, part) for a format, optionally some parts only."""
    rows = []
    for part, prefix, table in part_tables(fmt, adapter, tie_word_embeddings):
        if parts is not None and part not in parts and not (part == "lm_head" and "llm" in parts):
            continue
        for pattern, path, transform in table:
            rows.append((re.compile("^" + re.escape(prefix) + pattern + "$"), path, transform, part))
    return rows


def is_ignored(key: str) -> bool:
    """Whether a checkpoint key is a known buffer / foreign part that has no parameter."""
    return any(re.match(p, key) for p in IGNORED)


def match(key: str, rows):
    """(path, layer index or None, transform, part) for a key, or None when no row matches."""
    for rx, path, transform, part in rows:
        m = rx.match(key)
        if m:
            layer = int(m.group(1)) if m.groups() else None
            return path, layer, transform, part
    return None


def torch_key(path: str, layer: int | None, fmt: str, adapter: str = "mlp2x_gelu") -> str:
    """The checkpoint key of parameter `path` (layer `layer`) in format `fmt` (for export)."""
    for _part, prefix, table in part_tables(fmt, adapter):
        for pattern, p, _ in table:
            if p == path:
                key = pattern.replace(r"(\d+)", str(layer)) if layer is not None else pattern
                return prefix + key.replace("\\.", ".")
    raise KeyError(f"parameter {path} has no key in format {fmt!r}")
