"""A stage's LoRA set-up: the model with adapters, their fresh (sharded) arrays, what trains,
and the learning rates of the two groups (`train.lora`, `stages.N.lora`; models/lora.py)."""

from __future__ import annotations

import logging

import jax
from flax import nnx

from qilin_jax import sharding as S
from qilin_jax.models import QilinMedVL
from qilin_jax.models import lora as L
from qilin_jax.models import quant as Q
from qilin_jax.train.optim import path_str, trainable_mask

log = logging.getLogger("qilin_jax.train")


def lora_parts(parts, lc, mesh, rules, layer_shapes: dict | None = None):
    """ModelParts (train.state) of `parts.config` with the adapters of LoraConfig `lc` (None:
    none), and the decoder matrices quantized as in `layer_shapes` (a `llm/layers` dict)."""
    from qilin_jax.train.state import ModelParts

    def build():
        model = Q.attach_like(QilinMedVL(parts.config, rngs=nnx.Rngs(0)), layer_shapes or {})
        if lc is None:
            return model
        return L.add_lora(model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, use_rslora=lc.use_rslora)

    abstract_model = nnx.eval_shape(build)
    graphdef, abs_state = nnx.split(abstract_model)
    abstract = abs_state.to_pure_dict()
    axes = S.param_axes(abstract_model)
    return ModelParts(parts.config, graphdef, axes, S.tree_shardings(axes, abstract, mesh, rules), abstract)


def _same_spec(params: dict, lc) -> bool:
    layers = params["llm"]["layers"]
    spec = L.spec_from_params(layers)
    return (
        spec is not None
        and spec["rank"] == lc.rank
        and spec["targets"] == L.resolve_targets(lc.targets)
        and float(jax.device_get(layers[L.SCALING][0])) == L.scaling(lc.rank, lc.alpha, lc.use_rslora)
    )


def prepare_stage(cfg, stage, parts, params: dict, mesh, rules):
    """(parts, params, trainable patterns, lr_scales, lora dropout) for training `stage`.

    A LoRA stage gets the adapters of `train.lora` (kept when `params` already has adapters of
    that shape, e.g. a second LoRA stage; otherwise those are merged first and fresh ones
    made): the adapters' A/B and the stage's `trainable` patterns train, the rest is frozen.
    A stage without LoRA that starts from adapted parameters trains on their merged form."""
    kind = cfg.model.quantize
    if kind and Q.params_kind(params["llm"]["layers"]) is None:  # QLoRA: the frozen base quantized
        qparts = lora_parts(parts, None, mesh, rules, _quant_shapes(params, kind))
        params = jax.jit(lambda p: Q.quantize_params(p, kind), out_shardings=qparts.shardings)(params)
        log.info("stage %s: the LLM's matrices quantized to %s", stage.name, kind)
    quantized = Q.params_kind(params["llm"]["layers"]) is not None
    has = L.SCALING in params["llm"]["layers"]
    if not stage.lora:
        if has:
            log.info("stage %s: merging the previous stage's LoRA adapters into the LLM", stage.name)
            plain = lora_parts(parts, None, mesh, rules, params["llm"]["layers"]) if quantized else parts
            params = jax.jit(L.merge, out_shardings=plain.shardings)(params)
        if quantized:
            parts = lora_parts(parts, None, mesh, rules, params["llm"]["layers"])
            _check_float_trainable(params, stage.trainable, stage.name)
            params = frozen_in_compute_dtype(params, stage.trainable, parts.config.dtype, parts.shardings)
        return parts, params, list(stage.trainable), (), 0.0
    lc = cfg.train.lora
    new_parts = lora_parts(parts, lc, mesh, rules, params["llm"]["layers"])
    if has and not _same_spec(params, lc):
        log.info("stage %s: merging LoRA adapters of another shape before adding train.lora's", stage.name)
        plain = lora_parts(parts, None, mesh, rules, params["llm"]["layers"])
        params = jax.jit(L.merge, out_shardings=plain.shardings)(params)
        has = False
    if not has:
        base_layers = params["llm"]["layers"]
        lsh = {k: v for k, v in new_parts.shardings["llm"]["layers"].items() if k not in base_layers}
        shapes = L.base_shapes(base_layers)
        fresh = jax.jit(
            lambda: L.init_arrays(
                shapes, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, use_rslora=lc.use_rslora, seed=cfg.seed
            ),
            out_shardings=lsh,
        )()
        params = {**params, "llm": {**params["llm"], "layers": {**base_layers, **fresh}}}
    _check_float_trainable(params, stage.trainable, stage.name)
    patterns = L.trainable_patterns() + list(stage.trainable)
    if quantized:
        params = frozen_in_compute_dtype(params, patterns, parts.config.dtype, new_parts.shardings)
    scales = ()
    if lc.trainable_learning_rate is not None and stage.trainable:
        scales = tuple((p, lc.trainable_learning_rate / stage.learning_rate) for p in stage.trainable)
    n = sum(int(v.size) for k, v in params["llm"]["layers"].items() if k.endswith((L.SUFFIX_A, L.SUFFIX_B)))
    log.info(
        "stage %s: LoRA rank %d alpha %g on %s: %.2f M adapter parameters",
        stage.name,
        lc.rank,
        lc.alpha,
        ",".join(L.resolve_targets(lc.targets)),
        n / 1e6,
    )
    return new_parts, params, patterns, scales, lc.dropout


def _quant_shapes(params: dict, kind: str) -> dict:
    """The `llm/layers` shapes of `params` once quantized as `kind`."""
    return jax.eval_shape(lambda p: Q.quantize_params(p, kind), params)["llm"]["layers"]


def _check_float_trainable(params: dict, patterns, stage: str) -> None:
    """Quantized (integer) parameters cannot train: name the first one a pattern selects."""
    mask = trainable_mask(params, patterns)
    for (path, leaf), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask)):
        if m and not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            raise ValueError(
                f"stage {stage}: trainable parameter {path_str(path)} is quantized "
                f"({leaf.dtype}); train LoRA adapters on a quantized LLM (lora: true)"
            )


def frozen_in_compute_dtype(params: dict, patterns, dtype: str, shardings) -> dict:
    """With a quantized LLM (QLoRA) the frozen float parameters (ViT, embeddings, norms, head;
    not the quantization scales) are held in the compute dtype: the matmuls cast their weights
    to it anyway, so this only rounds what the norms use, and halves their memory under bf16
    (2.5 GB of the 13B's)."""
    import jax.numpy as jnp

    from qilin_jax.models.common import DTYPES

    dt = DTYPES[dtype]
    if dt == jnp.float32:
        return params
    mask = trainable_mask(params, patterns)

    def cast(path, p, m):
        keep = m or p.dtype != jnp.float32 or path_str(path).endswith(Q.SCALE)
        return p if keep else p.astype(dt)

    out_sh = jax.tree.map(lambda sh, p: sh, shardings, params)
    return jax.jit(lambda p: jax.tree_util.tree_map_with_path(cast, p, mask), out_shardings=out_sh)(params)
