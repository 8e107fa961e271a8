"""Data pipeline: sources, images, conversation templates, tokenization and the Grain loader.

`tokenize_conversation`, `build_prompt` and the image functions import nothing heavy;
`DataConfig`, `SampleProcessor` and the loader (`make_loader`, which imports Grain) load on
first use.
"""

from qilin_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TAG,
    TEMPLATES,
    build_prompt,
    default_image_token_id,
    prepare_conversation,
    prompt_text,
    tokenize_conversation,
    validate_conversation,
)
from qilin_jax.data.errors import REASONS, DataError
from qilin_jax.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    PAD_COLOR,
    composite_images,
    load_and_preprocess,
    load_image,
    preprocess_image,
)
from qilin_jax.data.prompts import (
    ALIGNMENT_PROMPTS_EN,
    ALIGNMENT_PROMPTS_ZH,
    INSTRUCTION_PROMPTS_EN,
    INSTRUCTION_PROMPTS_ZH,
    apply_prompt,
)

_LAZY = {
    "DataConfig": "qilin_jax.data.config",
    "Loader": "qilin_jax.data.pipeline",
    "make_loader": "qilin_jax.data.pipeline",
    "SampleProcessor": "qilin_jax.data.processor",
    "open_source": "qilin_jax.data.sources",
    "pmc_vqa_conversation": "qilin_jax.data.sources",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qilin_jax.data' has no attribute {name!r}")
