"""Model configuration: the three parts of Qilin-Med-VL and the named presets.

Field names follow the HF `transformers` configs users already know (hidden_size,
num_attention_heads, ...), so a `config.json` from a PyTorch checkpoint maps over directly.
The configs are frozen (a model's shapes are fixed once it is built): change one with
`dataclasses.replace`, or build one from a preset and a mapping of overrides with
`from_preset`. Their fields are checked against their annotations on construction
(qilin_jax.config_parse), so a wrong type or choice names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from qilin_jax.config_parse import ConfigError, FieldError, check_fields, merge, parse_dataclass


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (defaults: ViT-L/14-336)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Initialisation of the learned position embeddings: "normal" (std 0.02, as HF CLIP) or
    # "sincos2d" (2-D sine-cosine, big_vision's choice for ViTs trained from scratch: a strong
    # position signal from step 0). Only matters for training from scratch (the demo).
    position_embedding_init: Literal["normal", "sincos2d"] = "normal"

    def __hash__(self):  # hashable (nnx graph definitions are jit-static), dict fields included
        return hash(repr(self))

    def __post_init__(self):
        check_fields(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TextConfig:
    """LLaMA-2 decoder (defaults: Llama-2-13B / FlagAlpha Llama2-Chinese-13b-Chat)."""

    vocab_size: int = 32000
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope scaling: None, {"rope_type": "linear", "factor": 4.0}, or
    # {"rope_type": "dynamic", "factor": f} (dynamic NTK, as HF computes it).
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __hash__(self):  # hashable (nnx graph definitions are jit-static), dict fields included
        return hash(repr(self))

    def __post_init__(self):
        check_fields(self)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise FieldError(
                "num_attention_heads",
                f"{self.num_attention_heads} is not a multiple of num_key_value_heads ({self.num_key_value_heads})",
            )


@dataclass(frozen=True)
class QilinConfig:
    """The whole model: vision tower, adapter, decoder and how they are joined."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # "mlp2x_gelu" is what the released weights use; "linear" is what the paper describes.
    adapter: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    # HF-llava convention: every image occupies num_patches consecutive positions holding this
    # id. For a 32000-vocab LLaMA it is 32000 (the first id past the vocab, as HF llava adds it).
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # "default" drops CLS
    # Compute dtype; parameters are always stored in float32 (master weights).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Attention implementation: "auto" (cudnn on GPU in bf16/fp16, splash on TPU, xla else),
    # "xla", "cudnn", "splash" ("xla_reference": jax.nn.dot_product_attention, for comparison).
    attention: Literal["auto", "xla", "xla_reference", "cudnn", "splash"] = "auto"
    # Rematerialisation of each decoder/vision block in training: "none", "full", "save_dots".
    remat: Literal["none", "full", "save_dots"] = "none"
    # Sequence chunk for the memory-lean cross-entropy (0 = whole sequence at once).
    loss_chunk: int = 0
    # Run the LM head only on supervised positions (gathered into the smallest of a few
    # static per-row budgets; exact). See cross_entropy in qilin.py.
    loss_supervised_only: bool = False

    def __hash__(self):  # hashable (nnx graph definitions are jit-static), dict fields included
        return hash(repr(self))

    def __post_init__(self):
        check_fields(self)  # types and choices (Literal); vision/text given as mappings are parsed
        if self.loss_chunk < 0:
            raise FieldError("loss_chunk", f"must be >= 0, got {self.loss_chunk}")
        n = self.vision.num_hidden_layers
        if not -n - 1 <= self.vision_feature_layer <= n:
            raise FieldError(
                "vision_feature_layer",
                f"{self.vision_feature_layer} is outside [-{n + 1}, {n}] for a {n}-layer vision tower",
            )

    @property
    def image_tokens(self) -> int:
        """Positions one image occupies in the token sequence."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain dicts (config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> QilinConfig:
        """A QilinConfig from a mapping (config.json); errors name the key under `where`."""
        return parse_dataclass(cls, d, where)


def _qilin_13b(**kw) -> QilinConfig:
    return QilinConfig(vision=VisionConfig(), text=TextConfig(), **kw)


def _tiny(**kw) -> QilinConfig:
    # A model small enough for unit tests: every code path of the 13B model at toy size.
    vision = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    kw.setdefault("image_token_id", 128)
    return QilinConfig(vision=vision, text=text, **kw)


PRESETS = {
    # The released weights: mlp2x_gelu adapter, vocab 32000 (FlagAlpha Llama2-Chinese-13b-Chat).
    "qilin_med_vl_13b": lambda: _qilin_13b(),
    # What the paper describes: a single linear projection.
    "qilin_med_vl_13b_linear": lambda: _qilin_13b(adapter="linear"),
    # ymcui Chinese-LLaMA-2/Alpaca-2-13B backbone: vocab 55296.
    "qilin_med_vl_13b_ymcui": lambda: QilinConfig(text=TextConfig(vocab_size=55296), image_token_id=55296),
    # ymcui 16K variants: linear RoPE scaling factor 4.
    "qilin_med_vl_13b_ymcui_16k": lambda: QilinConfig(
        text=TextConfig(
            vocab_size=55296, max_position_embeddings=16384, rope_scaling={"rope_type": "linear", "factor": 4.0}
        ),
        image_token_id=55296,
    ),
    "tiny": _tiny,
}


# TextConfig fields filled from others in __post_init__ when None, and what they derive from.
_TEXT_DERIVED = {"head_dim": ("hidden_size", "num_attention_heads"), "num_key_value_heads": ("num_attention_heads",)}


class UnknownPreset(ConfigError, KeyError):
    """A preset name that is not a key of PRESETS."""

    __str__ = ValueError.__str__


def with_overrides(cfg: QilinConfig, overrides: dict | None, where: str = "model.overrides") -> QilinConfig:
    """`cfg` with a mapping of field overrides merged in (`vision` / `text` per key; the one
    merge rule, qilin_jax.config_parse.merge); errors name the key under `where`.

    The derived text fields (head_dim = hidden / heads, kv heads = heads) follow an overridden
    width or head count unless they are overridden too."""
    base = cfg.to_dict()
    overrides = overrides or {}
    text_over = overrides.get("text")
    if isinstance(text_over, dict):
        for derived, inputs in _TEXT_DERIVED.items():
            if derived not in text_over and any(k in text_over for k in inputs):
                base["text"][derived] = None
    return parse_dataclass(QilinConfig, merge(base, overrides), where)


def from_preset(name: str, overrides: dict | None = None, where: str = "model.overrides") -> QilinConfig:
    """The QilinConfig of preset `name` with a mapping of field overrides (`with_overrides`)."""
    if name not in PRESETS:
        key = where.removesuffix("overrides") + "preset" if where.endswith("overrides") else "preset"
        raise UnknownPreset(f"{key}: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return with_overrides(PRESETS[name](), overrides, where)


def model_preset(name: str, **overrides) -> QilinConfig:
    """Return the QilinConfig of a named preset (see PRESETS), with field overrides (values
    may be mappings or VisionConfig/TextConfig instances; see `from_preset`)."""
    over = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in overrides.items()}
    return from_preset(name, over, where="model_preset")
