"""Model configuration: the three parts of Qilin-Med-VL and the named presets.

Field names follow the HF `transformers` configs users already know (hidden_size,
num_attention_heads, ...), so a `config.json` from a PyTorch checkpoint maps over directly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
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
    position_embedding_init: str = "normal"

    def __hash__(self):  # hashable (nnx graph definitions are jit-static), dict fields included
        return hash(repr(self))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"text.num_key_value_heads ({self.num_key_value_heads})")


@dataclass
class QilinConfig:
    """The whole model: vision tower, adapter, decoder and how they are joined."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # "mlp2x_gelu" is what the released weights use; "linear" is what the paper describes.
    adapter: str = "mlp2x_gelu"
    # HF-llava convention: every image occupies num_patches consecutive positions holding this
    # id. For a 32000-vocab LLaMA it is 32000 (the first id past the vocab, as HF llava adds it).
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    # Compute dtype; parameters are always stored in float32 (master weights).
    dtype: str = "float32"
    # Attention implementation: "auto" (cudnn on GPU in bf16/fp16, splash on TPU, xla else),
    # "xla", "cudnn", "splash" ("xla_reference": jax.nn.dot_product_attention, for comparison).
    attention: str = "auto"
    # Rematerialisation of each decoder/vision block in training: "none", "full", "save_dots".
    remat: str = "none"
    # Sequence chunk for the memory-lean cross-entropy (0 = whole sequence at once).
    loss_chunk: int = 0
    # Run the LM head only on supervised positions (gathered into the smallest of a few
    # static per-row budgets; exact). See cross_entropy in qilin.py.
    loss_supervised_only: bool = False

    def __hash__(self):  # hashable (nnx graph definitions are jit-static), dict fields included
        return hash(repr(self))

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.adapter not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"model.adapter must be 'linear' or 'mlp2x_gelu', got {self.adapter!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("model.vision_feature_select_strategy must be 'default' or 'full'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.remat not in ("none", "full", "save_dots"):
            raise ValueError(f"model.remat must be none, full or save_dots, got {self.remat!r}")
        if self.attention not in ("auto", "xla", "xla_reference", "cudnn", "splash"):
            raise ValueError(f"model.attention must be auto, xla, xla_reference, cudnn or splash, "
                             f"got {self.attention!r}")
        if not isinstance(self.loss_supervised_only, bool):
            raise ValueError(f"model.loss_supervised_only must be true or false, "
                             f"got {self.loss_supervised_only!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be >= 0, got {self.loss_chunk}")
        n = self.vision.num_hidden_layers
        if not -n - 1 <= self.vision_feature_layer <= n:
            raise ValueError(f"model.vision_feature_layer {self.vision_feature_layer} is outside "
                             f"[-{n + 1}, {n}] for a {n}-layer vision tower")

    @property
    def image_tokens(self) -> int:
        """Positions one image occupies in the token sequence."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QilinConfig":
        return cls(**d)


def _qilin_13b(**kw) -> QilinConfig:
    return QilinConfig(vision=VisionConfig(), text=TextConfig(), **kw)


def _tiny(**kw) -> QilinConfig:
    # A model small enough for unit tests: every code path of the 13B model at toy size.
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, image_size=32, patch_size=8)
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    kw.setdefault("image_token_id", 128)
    return QilinConfig(vision=vision, text=text, **kw)


PRESETS = {
    # The released weights: mlp2x_gelu adapter, vocab 32000 (FlagAlpha Llama2-Chinese-13b-Chat).
    "qilin_med_vl_13b": lambda: _qilin_13b(),
    # What the paper describes: a single linear projection.
    "qilin_med_vl_13b_linear": lambda: _qilin_13b(adapter="linear"),
    # ymcui Chinese-LLaMA-2/Alpaca-2-13B backbone: vocab 55296.
    "qilin_med_vl_13b_ymcui": lambda: QilinConfig(text=TextConfig(vocab_size=55296),
                                                  image_token_id=55296),
    # ymcui 16K variants: linear RoPE scaling factor 4.
    "qilin_med_vl_13b_ymcui_16k": lambda: QilinConfig(
        text=TextConfig(vocab_size=55296, max_position_embeddings=16384,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
        image_token_id=55296),
    "tiny": _tiny,
}


def model_preset(name: str, **overrides) -> QilinConfig:
    """Return the QilinConfig of a named preset (see PRESETS), with top-level overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
