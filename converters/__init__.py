"""PyTorch <-> qilin-jax checkpoint conversion: readers, key tables, format detection, CLI.

    python -m converters to-jax --src DIR [--vision DIR] [--projector FILE] --dst DIR
    python -m converters to-torch --src DIR --dst DIR --format hf-llava|llava

From Python: `converters.to_jax.to_jax(...)` and `converters.to_torch.to_torch(...)`.
torch is never imported at module import time (only to read legacy pre-zip `.bin` files).
"""

from converters.mapping import ConversionError

__all__ = ["ConversionError"]
