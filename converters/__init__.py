"""PyTorch <-> qilin-jax checkpoint conversion: readers, key tables, format detection, CLI.

    python -m converters to-jax --src DIR [--vision DIR] [--projector FILE] --dst DIR
    python -m converters to-torch --src DIR --dst DIR --format hf-llava|llava

torch is never imported at module import time (only to read legacy pre-zip `.bin` files).
"""
from converters.mapping import ConversionError


def to_jax(*args, **kwargs):
    """Convert PyTorch checkpoint(s) into a qilin-jax checkpoint dir (see converters.to_jax)."""
    from converters.to_jax import to_jax as f
    return f(*args, **kwargs)


def to_torch(*args, **kwargs):
    """Export a qilin-jax checkpoint dir to PyTorch files (see converters.to_torch)."""
    from converters.to_torch import to_torch as f
    return f(*args, **kwargs)


__all__ = ["ConversionError", "to_jax", "to_torch"]
