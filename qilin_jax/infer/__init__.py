"""Inference: KV-cache generation, chat, batch inference, evaluation, sharded generation.

Names load on first use, so `from qilin_jax.infer import EvalConfig` does not import jax.
"""

_LAZY = {
    # (`generate` is the submodule here; the function is qilin_jax.generate.)
    "stream": "qilin_jax.infer.generate",
    "DecodeOptions": "qilin_jax.infer.config",
    "ChatConfig": "qilin_jax.infer.config",
    "BatchConfig": "qilin_jax.infer.config",
    "EvalConfig": "qilin_jax.infer.config",
    "section_from_dict": "qilin_jax.infer.config",
    "ChatSession": "qilin_jax.infer.chat",
    "run_chat": "qilin_jax.infer.chat",
    "run_batch": "qilin_jax.infer.batch",
    "answer_requests": "qilin_jax.infer.batch",
    "run_eval": "qilin_jax.infer.evaluate",
    "evaluate_demo": "qilin_jax.infer.evaluate",
    "evaluate_pmc_vqa": "qilin_jax.infer.evaluate",
    "evaluate_open": "qilin_jax.infer.evaluate",
    "parse_choice": "qilin_jax.infer.metrics",
    "score_choice": "qilin_jax.infer.metrics",
    "official_choice": "qilin_jax.infer.metrics",
    "letter_choice": "qilin_jax.infer.metrics",
    "SCORING_RULES": "qilin_jax.infer.metrics",
    "open_scores": "qilin_jax.infer.metrics",
    "INFERENCE_RULES": "qilin_jax.infer.sharded",
    "inference_mesh": "qilin_jax.infer.sharded",
    "inference_sharding": "qilin_jax.infer.sharded",
    "shard_model": "qilin_jax.infer.sharded",
    "load_for_inference": "qilin_jax.infer.sharded",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qilin_jax.infer' has no attribute {name!r}")
