"""The model and tokenizer a run config points at, for the tasks that use a trained model
(eval, chat, batch, the demo report) and for scripts."""

from __future__ import annotations

import logging
import os

from qilin_jax.config import RunConfig

log = logging.getLogger("qilin_jax")


def trained_checkpoint(cfg: RunConfig) -> str | None:
    """The newest finished stage's final checkpoint of this run, else model.checkpoint."""
    for stage in reversed(cfg.stages):
        d = os.path.join(cfg.run_dir, stage.name, "final")
        if os.path.exists(os.path.join(d, "config.json")):
            return d
    return cfg.model.checkpoint


def load_model(cfg: RunConfig, checkpoint: str | None = None, *, tensor_parallel: int = 1):
    """The model to evaluate/chat with: a checkpoint (in the config's compute dtype, straight onto
    the inference mesh, never whole in float32 on one device), or the config's random init;
    its LLM matrices quantized when `model.quantize` is set."""
    from flax import nnx

    from qilin_jax.infer.sharded import load_for_inference
    from qilin_jax.models import QilinMedVL

    ckpt = checkpoint or trained_checkpoint(cfg)
    if ckpt:
        dtype = cfg.model.overrides.get("dtype", "float32")
        return load_for_inference(ckpt, dtype=dtype, tensor_parallel=tensor_parallel, quantize=cfg.model.quantize)
    log.warning("no checkpoint: using randomly initialised weights")
    model = QilinMedVL(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
    if cfg.model.quantize:
        from qilin_jax.models.quant import quantize_model

        quantize_model(model, cfg.model.quantize)
    return model


def load_tokenizer(cfg: RunConfig):
    """The run's tokenizer, from model.tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer)
