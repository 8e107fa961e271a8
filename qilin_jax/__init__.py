"""qilin-jax: Qilin-Med-VL in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import qilin_jax` stays cheap, and the submodules import jax only when used.
    if name in ("load_pretrained", "save_pretrained"):
        from qilin_jax import checkpoint

        return getattr(checkpoint, name)
    if name == "generate":
        from qilin_jax.infer.generate import generate

        return generate
    if name in ("QilinMedVL", "QilinConfig", "model_preset"):
        from qilin_jax import models

        return getattr(models, name)
    raise AttributeError(f"module 'qilin_jax' has no attribute {name!r}")
