"""The curriculum runner: stage 1 -> stage 2 (-> ...) on a sharded mesh, resumable.

Each stage: build its data, split the parameters into trainable and frozen by the stage's
patterns, make its optimizer, restore its newest checkpoint if there is one, then loop:
batch -> jitted step -> (every N steps) metrics, checkpoint. At the end of a stage the full
parameters are written with `save_pretrained` to <run>/<stage>/final, which is what the
next stage starts from and what `qilin_jax.load_pretrained` reads.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx

from qilin_jax import sharding as S
from qilin_jax.config import RunConfig, StageConfig, dump_config
from qilin_jax.data.conversation import IGNORE_INDEX
from qilin_jax.models import QilinConfig, QilinMedVL
from qilin_jax.train.checkpointing import TrainCheckpointer
from qilin_jax.train.flops import device_peak_tflops, step_flops
from qilin_jax.train.lora import prepare_stage as prepare_lora_stage
from qilin_jax.train.optim import check_patterns, combine, make_optimizer, partition, trainable_mask
from qilin_jax.train.step import TrainState, compile_train_step, init_state, stack_micro

log = logging.getLogger("qilin_jax.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss under nan_policy=stop)."""


# --- test hooks -----------------------------------------------------------------------------
# Inert unless their environment variable is set; the robustness tests
# (tests/test_train_resume.py) use them to fail at a precise point of a real run.
#   QILIN_TEST_KILL_AT=[<stage>:]<step>:<phase>[:<SIGNAL>]   (SIGNAL default SIGKILL)
#     after_step:  after optimizer step <step> was run and logged, wait for in-flight
#                  checkpoint saves, then send SIGNAL to this process (SIGTERM = preemption:
#                  the run saves step <step> and stops).
#     during_save: in the middle of writing the checkpoint of step <step> (the data item is
#                  half written, the Orbax step directory still temporary), send SIGNAL.
#   QILIN_TEST_NAN_AT=[<stage>:]<step>[,<step>...]: the batch of those steps gets NaN pixel
#     values, so the loss and gradients are non-finite (exercises train.nan_policy).

KILL_ENV = "QILIN_TEST_KILL_AT"
NAN_ENV = "QILIN_TEST_NAN_AT"
_KILL_PHASES = ("after_step", "during_save")


def _split_stage(text: str, stage: str) -> str | None:
    """The part of a hook value for `stage` ("name:rest" or "rest" for every stage)."""
    head, sep, rest = text.partition(":")
    if sep and not head.strip().lstrip("-").isdigit():
        return rest if head.strip() == stage else None
    return text


def kill_hook_from_env(stage: str) -> tuple[int, str, signal.Signals] | None:
    """(step, phase, signal) of QILIN_TEST_KILL_AT for this stage, or None (the normal case)."""
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    rest = _split_stage(value, stage)
    if rest is None:
        return None
    parts = rest.split(":")
    try:
        step, phase = int(parts[0]), parts[1]
        sig = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGKILL
    except (IndexError, ValueError, KeyError):
        raise ValueError(f"{KILL_ENV}={value!r}: expected [<stage>:]<step>:<phase>[:<SIGNAL>]") from None
    if phase not in _KILL_PHASES:
        raise ValueError(f"{KILL_ENV}={value!r}: phase must be one of {_KILL_PHASES}")
    return step, phase, sig


def nan_steps_from_env(stage: str) -> set[int]:
    """The steps of this stage whose batch QILIN_TEST_NAN_AT poisons (empty normally)."""
    value = os.environ.get(NAN_ENV)
    rest = _split_stage(value, stage) if value else None
    return {int(x) for x in rest.split(",") if x.strip()} if rest else set()


# --- distributed / mesh ---------------------------------------------------------------------

def maybe_initialize_distributed(dcfg) -> None:
    """jax.distributed.initialize when configured or detected (SLURM, TPU pods, env vars).

    Values set in `distributed:` are passed on, the rest is auto-detected by JAX: e.g. under
    SLURM with one process per node, local_device_ids=[0,...,7] keeps all 8 GPUs (JAX's
    SLURM detection would otherwise give each process the one GPU of its local rank)."""
    if dcfg.enabled == "off" or jax.distributed.is_initialized():
        return
    kw = {k: v for k, v in dict(coordinator_address=dcfg.coordinator_address,
                                num_processes=dcfg.num_processes, process_id=dcfg.process_id,
                                local_device_ids=dcfg.local_device_ids).items() if v is not None}
    env = os.environ
    detected = (int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env
                or "MEGASCALE_COORDINATOR_ADDRESS" in env or "JAX_COORDINATOR_ADDRESS" in env)
    if dcfg.coordinator_address or dcfg.enabled == "on" or detected:
        jax.distributed.initialize(**kw)


def build_mesh(cfg: RunConfig):
    """The (data, fsdp, tensor) mesh of the run config and its logical-axis rules."""
    mesh = S.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return mesh, S.rules_with_overrides(cfg.mesh.rules)


# --- parameters -----------------------------------------------------------------------------

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
    keep = {k: getattr(run_cfg, k) for k in ("dtype", "attention", "remat", "loss_chunk",
                                              "loss_supervised_only") if k in ov}
    import dataclasses
    return dataclasses.replace(ck, **keep)


def head_tokens(config, batch: dict, processes: int = 1) -> int | None:
    """Positions the LM head runs on for a step whose host batch is `batch` (None = all, the
    usual MFU formula; with loss_supervised_only, the supervised ones, this host's times
    `processes`)."""
    if not config.loss_supervised_only or "labels" not in batch:
        return None
    return int((np.asarray(batch["labels"])[:, 1:] != IGNORE_INDEX).sum()) * processes


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


# --- batches --------------------------------------------------------------------------------

SEQ_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids")
# Below this many tokens a shared preamble is not worth the prefix path ("plain" has only BOS).
MIN_SHARED_PREFIX = 8


def split_shared_prefix(local: dict, prefix: np.ndarray) -> dict | None:
    """The host batch with `prefix` cut from the front of every row and added once as
    `prefix_ids` (train.shared_prefix), or None if the batch does not allow it: a row that
    does not start with it, padding or a position other than 0.. inside it, or a label on
    it or on the first token after it (the prefix's last position would predict that one).
    The model then computes the prefix once for the batch (QilinMedVL `prefix_ids`)."""
    P = len(prefix)
    ids = local["input_ids"]
    if P == 0 or ids.ndim != 2 or ids.shape[1] <= P or not np.array_equal(
            ids[:, :P], np.broadcast_to(prefix, (ids.shape[0], P))):
        return None
    if np.any(local["labels"][:, :P + 1] != IGNORE_INDEX):
        return None
    for k in ("attention_mask", "segment_ids"):
        if k in local and np.any(local[k][:, :P] != 1):
            return None
    if "position_ids" in local and np.any(local["position_ids"][:, :P] != np.arange(P)):
        return None
    out = {k: (v[:, P:] if k in SEQ_KEYS else v) for k, v in local.items()}
    out["prefix_ids"] = np.asarray(prefix, np.int32)
    return out


def stage_shared_prefix(cfg: RunConfig, data_cfg, tokenizer, model_cfg) -> np.ndarray | None:
    """The preamble the rows of this stage's batches share (train.shared_prefix), or None:
    off, packed rows (several samples per row), or a template whose preamble is too short."""
    if not cfg.train.shared_prefix:
        return None
    if data_cfg.packing:
        log.info("train.shared_prefix: off for packed rows")
        return None
    from qilin_jax.data.conversation import template_preamble

    prefix = template_preamble(tokenizer, data_cfg.template, image_token_id=model_cfg.image_token_id)
    if len(prefix) < MIN_SHARED_PREFIX:
        log.info("train.shared_prefix: the %r template's preamble has %d token(s); not shared",
                 data_cfg.template, len(prefix))
        return None
    log.info("train.shared_prefix: the %d-token %r preamble runs once per batch",
             len(prefix), data_cfg.template)
    return prefix


def batch_shardings(mesh, rules, example: dict) -> dict:
    """Shardings of a micro-stacked global batch: dim 1 (rows) over the batch axes; the
    shared prefix (one copy for all rows) replicated."""
    out = {}
    for k, v in example.items():
        if k == "prefix_ids":
            out[k] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            continue
        spec = S.spec_for((None, "batch") + (None,) * (v.ndim - 2), v.shape, mesh, rules)
        out[k] = jax.sharding.NamedSharding(mesh, spec)
    return out


def to_global(local: dict, shardings: dict) -> dict:
    """Global jax arrays from this process's batch (multi-host: each host gives its rows;
    the replicated shared prefix is the same on every host)."""
    out = {}
    for k, v in local.items():
        sh = shardings[k]
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sh)
        else:
            out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


def common_batch(local: dict, prefix: np.ndarray | None) -> tuple[dict, dict | None]:
    """(this process's batch padded to the longest sequence bucket of all processes, and that
    batch with the shared prefix cut (`split_shared_prefix`), or None when `prefix` is None or
    some process's batch does not allow it).

    Each host's loader picks the bucket of its own rows, but a global array needs the same
    shape everywhere, and all processes must compile and run the same step (with or without
    the prefix). With several processes this is one small all-gather per step for both.
    Padding (id 0, label -100, mask/segment/position 0) is what the collator itself appends,
    so the loss does not change; it only adds columns at the end, so it does not change
    whether the prefix fits."""
    shared = None if prefix is None else split_shared_prefix(local, prefix)
    if jax.process_count() == 1:
        return local, shared
    from jax.experimental import multihost_utils

    t = local["input_ids"].shape[1]
    got = multihost_utils.process_allgather(np.array([t, shared is not None], np.int32)).reshape(-1, 2)
    t_max, fits = int(np.max(got[:, 0])), bool(np.all(got[:, 1]))
    if t_max != t:
        fill = {"labels": IGNORE_INDEX}
        local = dict(local)
        for k in ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids"):
            if k in local:
                v = local[k]
                pad = np.full((v.shape[0], t_max - t) + v.shape[2:], fill.get(k, 0), v.dtype)
                local[k] = np.concatenate([v, pad], axis=1)
        if shared is not None:
            shared = split_shared_prefix(local, prefix)
    return local, (shared if fits else None)


def global_shape_example(local: dict) -> dict:
    """ShapeDtypeStructs of the global batch (rows of all processes)."""
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct(v.shape if k == "prefix_ids" else
                                    (v.shape[0], v.shape[1] * n) + v.shape[2:], v.dtype)
            for k, v in local.items()}


# --- logging --------------------------------------------------------------------------------

class MetricsWriter:
    """Per-step metrics to JSONL and TensorBoard event files, from process 0 only."""

    def __init__(self, run_dir: str, lcfg, stage: str):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if lcfg.jsonl:
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if lcfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard", stage))
            except ImportError:  # optional: JSONL still has everything
                log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, stage: str, step: int, m: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"stage": stage, "step": step, **m}) + "\n")
        if self.tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)

    def flush(self):
        if self.jsonl:
            self.jsonl.flush()
        if self.tb:
            self.tb.flush()

    def close(self):
        self.flush()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class _Signals:
    """SIGTERM/SIGINT set a flag: the loop saves a checkpoint and stops (preemption)."""

    def __init__(self, enabled: bool):
        self.hit = None
        self._old = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread
                    pass

    def _handler(self, signum, frame):
        self.hit = signal.Signals(signum).name

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


# --- the runner -----------------------------------------------------------------------------

@dataclass
class StageResult:
    """What a stage produced."""

    name: str
    final_dir: str
    steps: int
    losses: list = field(default_factory=list)
    interrupted: str | None = None
    skipped_nonfinite: int = 0
    data_stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    shared_prefix_tokens: int = 0  # train.shared_prefix: the preamble's length (0 = off)
    unshared_batches: int = 0  # batches it did not fit, run whole
    packing_estimate: dict | None = None  # packed stages without max_steps: what set the step count


def stage_total_steps(stage: StageConfig, loader, data_cfg, packing_estimate: dict | None = None) -> int:
    """Optimizer updates of a stage: max_steps, or epochs x batches per epoch. Unpacked, a batch
    is batch_size samples; packed, batch_size rows of several samples each, so the rows per
    epoch come from `packing_estimate` (`pipeline.estimate_packed_rows`: source samples x rows
    per sample). The data repeats (run_stage), so this count, not the end of the data, ends
    the stage and its schedule."""
    if stage.max_steps is not None:
        return int(stage.max_steps)
    per_batch = data_cfg.batch_size  # run_stage made it batch_size x grad_accum_steps
    rows = loader.num_samples
    what = "samples"
    if packing_estimate is not None:
        rows = int(loader.num_samples * packing_estimate["rows_per_sample"])
        what = f"samples (~{rows} packed rows)"
    per_epoch = rows // per_batch
    if per_epoch < 1:
        raise TrainingError(f"stage {stage.name}: {loader.num_samples} {what} per process make no "
                            f"batch of {per_batch} (batch_size x grad_accum_steps)")
    return max(1, int(stage.num_epochs * per_epoch))


class StepProfiler:
    """jax.profiler trace of host steps first..last (1-based, inclusive) into `log_dir`.

    `before(step)` starts the trace before step `first` is dispatched; `after(step, out)`
    waits for that step's outputs (so the trace holds the device work, not only the dispatch)
    and stops after step `last`. `close()` stops a trace left open (a stage that ended or
    was interrupted inside the window). Inert when `steps` is empty.
    """

    def __init__(self, steps, log_dir: str):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.log_dir = log_dir
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            os.makedirs(self.log_dir, exist_ok=True)
            jax.profiler.start_trace(self.log_dir)
            self.active = True
            log.info("profiling steps %d-%d into %s", self.first, self.last, self.log_dir)

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def run_stage(cfg: RunConfig, stage: StageConfig, parts: ModelParts, params: dict, mesh, rules,
              *, tokenizer, progress=None) -> tuple[dict, StageResult]:
    """Train one stage from `params`; returns (the stage's final params, StageResult)."""
    from qilin_jax.checkpoint import save_pretrained
    from qilin_jax.data.pipeline import make_loader

    t_start = time.time()
    stage_dir = os.path.join(cfg.run_dir, stage.name)
    if jax.process_index() == 0:  # the resolved config next to the stage's checkpoints
        dump_config(cfg, os.path.join(stage_dir, "config.yaml"))
    final_dir = os.path.join(stage_dir, "final")
    data_cfg = cfg.stage_data(stage)
    accum = stage.grad_accum_steps
    # One loader batch is one optimizer step: data.batch_size rows per micro-batch times
    # grad_accum_steps (stack_micro splits it), so a step sees batch_size x accum rows.
    data_cfg.batch_size *= accum
    # The data repeats and the step count (max_steps, or epochs of the data) ends the stage and
    # its schedule. An epoch's batches are not known exactly in advance: skipped samples and
    # packing make them fewer, and differ between processes. Had the data ended there, the
    # stage would stop before its schedule did, and in a multi-host run one process would
    # leave the others waiting in the step's collectives. Here the next epoch's first
    # samples make up for the skipped ones.
    data_cfg.num_epochs = None
    loader = make_loader(data_cfg, tokenizer)
    packing_estimate = None
    if data_cfg.packing and stage.max_steps is None:
        from qilin_jax.data.pipeline import estimate_packed_rows

        packing_estimate = estimate_packed_rows(data_cfg, loader.tokenizer, loader.source)
    total = stage_total_steps(stage, loader, data_cfg, packing_estimate)
    if packing_estimate is not None:
        log.info("stage %s: packing ~%.2f samples per row (from %d samples%s) -> %d steps for %s "
                 "epoch(s)", stage.name, packing_estimate["samples_per_row"], packing_estimate["sampled"],
                 ", the whole source" if packing_estimate["whole_source"] else "", total, stage.num_epochs)

    check_patterns(params, stage.trainable, f"stages.{stage.name}.trainable")
    parts, params, patterns, lr_scales, lora_dropout = prepare_lora_stage(cfg, stage, parts, params, mesh, rules)
    tx, schedule = make_optimizer(stage, total, lr_scales)
    state, frozen, state_sh, f_sh = init_stage_state(parts, params, patterns, tx, mesh,
                                                     seed=cfg.seed)

    ckpt = TrainCheckpointer(os.path.join(stage_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        ckpt.close()
        raise TrainingError(
            f"stage {stage.name}: {ckpt.directory} holds checkpoints (newest: step {latest}) but "
            f"checkpoint.resume=false: choose another run `name`, delete that folder, or resume")
    if latest is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        state, data_state = ckpt.restore(latest, abstract)
        state = TrainState(*state) if not isinstance(state, TrainState) else state
        if data_state is not None:
            loader.set_state(data_state)
        start = latest
        log.info("stage %s: resumed from step %d", stage.name, latest)

    prefix = stage_shared_prefix(cfg, data_cfg, tokenizer, parts.config)
    unshared = 0  # batches the shared prefix did not fit (run whole)
    writer = MetricsWriter(cfg.run_dir, cfg.logging, stage.name)
    profiler = StepProfiler(cfg.train.profile_steps, os.path.join(stage_dir, "profile"))
    signals = _Signals(cfg.checkpoint.save_on_signal)
    kill_hook = kill_hook_from_env(stage.name)
    nan_steps = nan_steps_from_env(stage.name)
    result = StageResult(stage.name, final_dir, start, packing_estimate=packing_estimate)
    n_dev = jax.device_count()
    peak = cfg.train.peak_tflops or device_peak_tflops(jax.devices()[0])
    step_fns: dict = {}  # with / without a shared prefix: (jitted step, batch shardings)
    pending: list = []
    host_step = start
    t_last = time.time()
    steps_since = 0
    tokens_since = 0
    flops_since = 0.0
    bar = None
    if cfg.logging.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc=stage.name, dynamic_ncols=True, leave=True)

    def flush(force_check: bool):
        """Fetch pending metrics (one host sync), log them, enforce the NaN policy."""
        nonlocal pending, t_last, steps_since, tokens_since, flops_since
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        dt = time.time() - t_last
        tps = tokens_since / dt if dt > 0 else 0.0
        mfu = (flops_since / dt / n_dev / (peak * 1e12)) if (peak and dt > 0) else None
        bad = []
        for (step, _), m in zip(pending, fetched):
            row = {k: float(v) for k, v in m.items() if k != "finite"}
            row["finite"] = bool(m["finite"])
            row["tokens_per_s"] = tps
            row["step_time_s"] = dt / max(1, steps_since)
            if mfu is not None:
                row["mfu"] = mfu
            writer.write(stage.name, step, row)
            result.losses.append(row["loss"])
            if not row["finite"]:
                bad.append(step)
        writer.flush()
        last = fetched[-1]
        if bar is not None:
            post = dict(loss=f"{float(last['loss']):.4f}", lr=f"{float(last['lr']):.2e}",
                        gnorm=f"{float(last['grad_norm']):.3f}", tok_s=f"{tps:,.0f}")
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(post, refresh=False)
        pending = []
        t_last = time.time()
        steps_since = tokens_since = 0
        flops_since = 0.0
        if bad:
            result.skipped_nonfinite += len(bad)
            if cfg.train.nan_policy == "stop":
                ckpt.wait()  # an in-flight save is a good one: name it, not the one before
                good = ckpt.latest_step()
                where = (f"The last good checkpoint is step {good} in {ckpt.directory} (a rerun "
                         f"resumes from it)" if good is not None else
                         f"There is no checkpoint of this stage yet in {ckpt.directory}")
                raise TrainingError(
                    f"stage {stage.name}: non-finite loss or gradient at step(s) {bad}; the update "
                    f"was not applied and no checkpoint was written after it. {where}. Lower the "
                    f"learning rate, check the data, or set train.nan_policy=skip")
            log.warning("stage %s: skipped non-finite update(s) at step(s) %s", stage.name, bad)

    try:
        while host_step < total:
            try:
                local = next(loader)
            except StopIteration:
                log.warning("stage %s: data ended after %d of %d steps", stage.name, host_step, total)
                break
            local, shared = common_batch(local, prefix)
            if prefix is not None and shared is None:
                unshared += 1
                if unshared == 1:
                    log.warning("stage %s: step %d: a batch does not start with the shared prefix "
                                "in every row; such batches run whole (counted in the summary)",
                                stage.name, host_step + 1)
            micro = stack_micro(shared or local, accum)
            if host_step + 1 in nan_steps:  # test hook: poison this batch
                micro = {**micro, "pixel_values": np.full_like(micro["pixel_values"], np.nan)}
            key = shared is not None
            if key not in step_fns:
                b_sh = batch_shardings(mesh, rules, global_shape_example(micro))
                step_fns[key] = (compile_train_step(
                    parts.graphdef, tx, schedule, state_shardings=state_sh, frozen_shardings=f_sh,
                    batch_shardings=b_sh, packed=bool(data_cfg.packing), lora_dropout=lora_dropout), b_sh)
            step_fn, b_sh = step_fns[key]
            gb = to_global(micro, b_sh)
            profiler.before(host_step + 1)
            with S.activation_sharding(mesh, rules):
                state, metrics = step_fn(state, frozen, gb)
            host_step += 1
            profiler.after(host_step, (state, metrics))
            steps_since += 1
            tokens_since += int(local["attention_mask"].sum()) * jax.process_count()
            B, T = (shared or local)["input_ids"].shape
            llm_trainable = any(p.startswith("llm") for p in stage.trainable)
            flops_since += step_flops(parts.config, B * jax.process_count(), T,
                                      int(local["image_valid"].sum()) * jax.process_count(),
                                      llm_trainable=llm_trainable,
                                      head_tokens=head_tokens(parts.config, local, jax.process_count()))
            if shared is not None:  # the prefix, once per micro-batch (its attention to the rows' keys aside)
                flops_since += accum * step_flops(parts.config, 1, len(prefix), 0,
                                                  llm_trainable=llm_trainable, head_tokens=0)
            pending.append((host_step, metrics))
            if bar is not None:
                bar.update(1)
            save_now = bool(cfg.checkpoint.every_steps) and host_step % cfg.checkpoint.every_steps == 0
            sync_point = host_step % cfg.logging.every_steps == 0 or save_now
            if kill_hook and kill_hook[:2] == (host_step, "after_step"):
                flush(force_check=True)
                _test_signal_self(kill_hook[2], ckpt, writer, signals)
            stop = _stop_requested(signals, sync_point)
            if sync_point or stop:
                flush(force_check=True)
            if kill_hook and kill_hook[:2] == (host_step, "during_save"):
                ckpt.test_kill_during_save = (host_step, kill_hook[2])
            if stop:  # preemption: save this step now, then leave
                ckpt.save(host_step, state, loader.get_state(), force=True)
                ckpt.wait()
                result.interrupted = signals.hit or "signal on another process"
                break
            if save_now and host_step < total:
                ckpt.save(host_step, state, loader.get_state())
        flush(force_check=True)
        if result.interrupted is None:
            ckpt.save(host_step, state, loader.get_state(), force=True)
        ckpt.wait()
    finally:
        profiler.close()
        signals.restore()
        writer.close()
        ckpt.close()
        if bar is not None:
            bar.close()
        result.data_stats = loader.stats()
        result.shared_prefix_tokens = 0 if prefix is None else len(prefix)
        result.unshared_batches = unshared
        loader.close()
    result.steps = host_step
    final = combine(state.trainable, frozen)
    if result.interrupted is None:
        save_pretrained(final, parts.config, final_dir, overwrite=True)
    result.seconds = time.time() - t_start
    return final, result


def _stop_requested(signals: "_Signals", sync_point: bool) -> bool:
    """Whether to save and stop after this step. With several processes every one must take
    the same decision at the same step (a lone save or break would leave the others blocked
    in the next collective), so the flags are combined across processes, at the steps every
    process treats as sync points (logging/checkpoint steps) only: that costs no extra host
    synchronisation in between."""
    if jax.process_count() == 1:
        return signals.hit is not None
    if not sync_point:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([signals.hit is not None], np.int32))
    return bool(np.any(flags))


def _test_signal_self(sig, ckpt, writer, signals) -> None:
    """Test hook: finish logs (and, before a SIGKILL, in-flight saves), then send `sig` to
    this process (SIGKILL never returns; a handled SIGTERM/SIGINT returns once the handler
    has set its flag)."""
    if sig == signal.SIGKILL:  # not for SIGTERM: with several processes the wait may sync hosts
        ckpt.wait()
    writer.flush()
    log.warning("test hook %s: sending %s to myself", KILL_ENV, sig.name)
    os.kill(os.getpid(), sig)
    deadline = time.time() + 10
    while signals.hit is None and time.time() < deadline:  # the handler runs between bytecodes
        time.sleep(0.01)


def train_state_shardings(opt_state, trainable_shardings, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameters, step/rng replicated."""
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(repl, trainable_shardings,
                      _match_opt_shardings(opt_state, trainable_shardings, repl), repl)


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


def run_training(cfg: RunConfig, *, tokenizer=None) -> list[StageResult]:
    """Run every stage of the curriculum in order; returns their results."""
    maybe_initialize_distributed(cfg.distributed)
    mesh, rules = build_mesh(cfg)
    model_cfg = resolve_model_config(cfg)
    parts = model_parts(model_cfg, mesh, rules)
    tokenizer = tokenizer or cfg.model.tokenizer
    if isinstance(tokenizer, str):  # load once, not once per stage (seconds each)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if jax.process_index() == 0:
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    params = None
    results = []
    for i, stage in enumerate(cfg.stages):
        final_dir = os.path.join(cfg.run_dir, stage.name, "final")
        if cfg.checkpoint.resume and os.path.exists(os.path.join(final_dir, "config.json")):
            log.info("stage %s already finished: %s", stage.name, final_dir)
            from qilin_jax.checkpoint import load_pretrained
            model = load_pretrained(final_dir, mesh=mesh, rules=rules, config=model_cfg)
            params = nnx.state(model, nnx.Param).to_pure_dict()
            results.append(StageResult(stage.name, final_dir, -1))
            continue
        if params is None:
            params = init_params(parts, cfg.seed, cfg.model.checkpoint, mesh, rules)
        if stage.init_from != "previous":
            params = _load_parts(params, stage, parts, mesh, rules)
        params, res = run_stage(cfg, stage, parts, params, mesh, rules, tokenizer=tokenizer)
        results.append(res)
        if res.interrupted:
            break
    return results


def _load_parts(params: dict, stage: StageConfig, parts: ModelParts, mesh, rules) -> dict:
    """Replace the stage's trainable parameters by those of checkpoint `stage.init_from`."""
    from qilin_jax.checkpoint import load_pretrained

    src = nnx.state(load_pretrained(stage.init_from, mesh=mesh, rules=rules, config=parts.config),
                    nnx.Param).to_pure_dict()
    mask = trainable_mask(params, stage.trainable)
    new_t, _ = partition(src, mask)
    _, frozen = partition(params, mask)
    return combine(new_t, frozen)
