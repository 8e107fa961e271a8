"""The tasks main.py runs from a config, in the order of `tasks:`."""
from __future__ import annotations

import json
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


def load_model(cfg: RunConfig, checkpoint: str | None = None):
    """The model to evaluate/chat with: a checkpoint, or the config's random init."""
    from flax import nnx
    from qilin_jax.checkpoint import load_pretrained
    from qilin_jax.models import QilinMedVL

    ckpt = checkpoint or trained_checkpoint(cfg)
    if ckpt:
        return load_pretrained(ckpt)
    log.warning("no checkpoint: using randomly initialised weights")
    return QilinMedVL(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer)


def run(cfg: RunConfig) -> dict:
    """Run the config's tasks; returns what each produced."""
    out: dict = {}
    os.makedirs(cfg.run_dir, exist_ok=True)
    for task in cfg.tasks:
        if task == "prepare_demo":
            from qilin_jax import demo
            out[task] = demo.prepare(cfg)
        elif task == "train":
            from qilin_jax.train.loop import run_training
            results = run_training(cfg)
            out[task] = [r.__dict__ for r in results]
            summary = [{k: v for k, v in r.__dict__.items() if k != "losses"} for r in results]
            with open(os.path.join(cfg.run_dir, "train_summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=str)
        elif task == "eval":
            from qilin_jax.infer.config import EvalConfig
            from qilin_jax.infer.evaluate import run_eval
            # Evaluation output goes into the run folder unless the config says otherwise.
            ecfg = EvalConfig(**{"output_dir": os.path.join(cfg.run_dir, "eval"), **cfg.eval})
            out[task] = run_eval(load_model(cfg), load_tokenizer(cfg), ecfg)
        elif task == "chat":
            from qilin_jax.infer.chat import run_chat
            from qilin_jax.infer.config import ChatConfig
            out[task] = run_chat(load_model(cfg), load_tokenizer(cfg), ChatConfig(**cfg.chat))
        elif task == "batch":
            from qilin_jax.infer.batch import run_batch
            from qilin_jax.infer.config import BatchConfig
            out[task] = run_batch(load_model(cfg), load_tokenizer(cfg), BatchConfig(**cfg.batch))
        elif task == "report":
            from qilin_jax import demo
            out[task] = demo.report(cfg, out)
    return out
