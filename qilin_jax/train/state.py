"""The model and train state of a run: abstract shapes and shardings, parameter
initialisation or loading, and the sharded (trainable + optimizer, frozen) split of a stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from qilin_jax import sharding as S
from qilin_jax.config import RunConfig, StageConfig
from qilin_jax.models import QilinConfig, QilinMedVL
from qilin_jax.train.optim import combine, partition, trainable_mask
from qilin_jax.train.step import TrainState, init_state


@dataclass
class ModelParts:
    """An abstract model's graph definition, config, logical axes and target shardings."""

    config: QilinConfig
    graphdef: Any
    axes: dict
    shardings: dict
    abstract: dict


def model_parts(model_cfg: QilinConfig, mesh, rules) -> ModelParts:
    """Shapes, axes and shardings of a model config, without allocating parameters."""
    abstract_model = nnx.eval_shape(lambda: QilinMedVL(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract_model)
    abstract = abs_state.to_pure_dict()
    axes = S.param_axes(abstract_model)
    return ModelParts(model_cfg, graphdef, axes, S.tree_shardings(axes, abstract, mesh, rules), abstract)


def resolve_model_config(cfg: RunConfig) -> QilinConfig:
    """The model config: the checkpoint's (if any) with the run's compute settings on top."""
    run_cfg = cfg.model_config()
    if not cfg.model.checkpoint:
        return run_cfg
    from qilin_jax.checkpoint import read_config

    ck = read_config(cfg.model.checkpoint)
    ov = cfg.model.overrides
    keep = {
        k: getattr(run_cfg, k) for k in ("dtype", "attention", "remat", "loss_chunk", "loss_supervised_only") if k in ov
    }
    return dataclasses.replace(ck, **keep)


def init_params(parts: ModelParts, seed: int, checkpoint: str | None, mesh, rules) -> dict:
    """Sharded parameters: from a checkpoint, or randomly initialised on the devices directly."""
    if checkpoint:
        from qilin_jax.checkpoint import load_pretrained

        model = load_pretrained(checkpoint, mesh=mesh, rules=rules, config=parts.config)
        return nnx.state(model, nnx.Param).to_pure_dict()
    cfg = parts.config

    def make():
        return nnx.state(QilinMedVL(cfg, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()

    return jax.jit(make, out_shardings=parts.shardings)()


def load_stage_init(params: dict, stage: StageConfig, parts: ModelParts, mesh, rules) -> dict:
    """`params` with the stage's trainable parameters replaced by those of checkpoint
    `stage.init_from`."""
    from qilin_jax.checkpoint import load_pretrained

    src = nnx.state(
        load_pretrained(stage.init_from, mesh=mesh, rules=rules, config=parts.config), nnx.Param
    ).to_pure_dict()
    mask = trainable_mask(params, stage.trainable)
    new_t, _ = partition(src, mask)
    _, frozen = partition(params, mask)
    return combine(new_t, frozen)


def train_state_shardings(opt_state, trainable_shardings, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameters, step/rng replicated."""
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(repl, trainable_shardings, _match_opt_shardings(opt_state, trainable_shardings, repl), repl)


def init_stage_state(parts: ModelParts, params: dict, patterns, tx, mesh, *, seed: int = 0):
    """(state, frozen, state shardings, frozen shardings) for training `patterns` of `params`:
    the trainable subtree gets a fresh optimizer state, both are placed on the mesh."""
    mask = trainable_mask(params, patterns)
    trainable, frozen = partition(params, mask)
    t_sh, f_sh = partition(parts.shardings, mask)
    state = jax.jit(lambda t: init_state(t, tx, seed))(trainable)
    state_sh = train_state_shardings(state.opt_state, t_sh, mesh)
    return jax.device_put(state, state_sh), frozen, state_sh, f_sh


def _match_opt_shardings(opt_state, param_shardings, repl):
    """Shardings for an optax state: subtrees shaped like the params get the param shardings."""
    p_struct = jax.tree.structure(param_shardings)

    def visit(node):
        try:
            if jax.tree.structure(node) == p_struct:
                return param_shardings
        except Exception:
            pass
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[visit(c) for c in node])
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c) for c in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return repl

    return visit(opt_state)
