"""The curriculum runner: stage 1 -> stage 2 (-> ...) on a sharded mesh, resumable.

Each stage: build its data, split the parameters into trainable and frozen by the stage's
patterns, make its optimizer, restore its newest checkpoint if there is one, then loop:
batch -> jitted step -> (every N steps) metrics, checkpoint. At the end of a stage the full
parameters are written with `save_pretrained` to <run>/<stage>/final, which is what the
next stage starts from and what `qilin_jax.load_pretrained` reads.

The rest of the loop lives beside it: `state` (model shapes, shardings, parameters, the
train state of a stage), `distributed` (mesh, global batches, multi-host agreement),
`shared_prefix` (train.shared_prefix), `metrics` (logging, throughput, profiling) and
`signals` (preemption).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
from flax import nnx

from qilin_jax import sharding as S
from qilin_jax.config import RunConfig, StageConfig, dump_config
from qilin_jax.train.checkpointing import TrainCheckpointer
from qilin_jax.train.distributed import (
    batch_shardings,
    build_mesh,
    common_batch,
    global_shape_example,
    maybe_initialize_distributed,
    to_global,
)
from qilin_jax.train.flops import device_peak_tflops, step_flops
from qilin_jax.train.lora import prepare_stage as prepare_lora_stage
from qilin_jax.train.metrics import MetricsWriter, StepProfiler, StepWindow, head_tokens, progress_postfix
from qilin_jax.train.optim import check_patterns, combine, make_optimizer
from qilin_jax.train.shared_prefix import stage_shared_prefix
from qilin_jax.train.signals import StopSignals, stop_requested
from qilin_jax.train.state import (
    ModelParts,
    init_params,
    init_stage_state,
    load_stage_init,
    model_parts,
    resolve_model_config,
)
from qilin_jax.train.step import TrainState, compile_train_step, stack_micro

log = logging.getLogger("qilin_jax.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss under nan_policy=stop)."""


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


@dataclass
class StageRun:
    """The state of one stage's loop that changes from step to step, with what it writes to;
    the loop's helpers and `TrainHooks` receive it."""

    name: str
    step: int  # optimizer steps done (host side; the device may still be running the last)
    result: StageResult
    writer: MetricsWriter
    ckpt: TrainCheckpointer
    signals: StopSignals
    nan_policy: str
    n_devices: int
    peak_tflops: float | None
    bar: Any = None  # tqdm progress bar on process 0
    window: StepWindow = field(default_factory=StepWindow)
    unshared: int = 0  # batches the shared prefix did not fit (run whole)

    def flush(self) -> None:
        """Fetch the queued metrics (one host sync), log them, enforce the NaN policy."""
        rows = self.window.fetch(self.n_devices, self.peak_tflops)
        if not rows:
            return
        bad = []
        for step, row in rows:
            self.writer.write(self.name, step, row)
            self.result.losses.append(row["loss"])
            if not row["finite"]:
                bad.append(step)
        self.writer.flush()
        if self.bar is not None:
            self.bar.set_postfix(progress_postfix(rows[-1][1]), refresh=False)
        if not bad:
            return
        self.result.skipped_nonfinite += len(bad)
        if self.nan_policy == "stop":
            self.ckpt.wait()  # an in-flight save is a good one: name it, not the one before
            good = self.ckpt.latest_step()
            where = (
                f"The last good checkpoint is step {good} in {self.ckpt.directory} (a rerun resumes from it)"
                if good is not None
                else f"There is no checkpoint of this stage yet in {self.ckpt.directory}"
            )
            raise TrainingError(
                f"stage {self.name}: non-finite loss or gradient at step(s) {bad}; the update "
                f"was not applied and no checkpoint was written after it. {where}. Lower the "
                f"learning rate, check the data, or set train.nan_policy=skip"
            )
        log.warning("stage %s: skipped non-finite update(s) at step(s) %s", self.name, bad)


class TrainHooks:
    """Callbacks into the stage loop (instrumentation, fault-injection tests); these defaults
    change nothing. Pass a subclass (or any object with these methods) to
    `run_training(cfg, hooks=...)`."""

    def batch(self, run: StageRun, micro: dict) -> dict:
        """The micro-stacked host batch of step `run.step + 1` as it is to be trained."""
        return micro

    def after_step(self, run: StageRun) -> None:
        """Called once step `run.step` is dispatched and queued for logging, before the loop
        decides whether to stop and whether to save a checkpoint."""


def stage_total_steps(stage: StageConfig, loader, data_cfg, packing_estimate: dict | None = None) -> int:
    """Optimizer updates of a stage: max_steps, or epochs x batches per epoch. Unpacked, a batch
    is batch_size samples; packed, batch_size rows of several samples each, so the rows per
    epoch come from `packing_estimate` (`packing.estimate_packed_rows`: source samples x rows
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
        raise TrainingError(
            f"stage {stage.name}: {loader.num_samples} {what} per process make no "
            f"batch of {per_batch} (batch_size x grad_accum_steps)"
        )
    return max(1, int(stage.num_epochs * per_epoch))


def run_stage(
    cfg: RunConfig,
    stage: StageConfig,
    parts: ModelParts,
    params: dict,
    mesh,
    rules,
    *,
    tokenizer,
    hooks: TrainHooks | None = None,
) -> tuple[dict, StageResult]:
    """Train one stage from `params`; returns (the stage's final params, StageResult)."""
    from qilin_jax.checkpoint import save_pretrained
    from qilin_jax.data.pipeline import make_loader

    hooks = hooks or TrainHooks()
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
        from qilin_jax.data.packing import estimate_packed_rows

        packing_estimate = estimate_packed_rows(data_cfg, loader.tokenizer, loader.source)
    total = stage_total_steps(stage, loader, data_cfg, packing_estimate)
    if packing_estimate is not None:
        log.info(
            "stage %s: packing ~%.2f samples per row (from %d samples%s) -> %d steps for %s epoch(s)",
            stage.name,
            packing_estimate["samples_per_row"],
            packing_estimate["sampled"],
            ", the whole source" if packing_estimate["whole_source"] else "",
            total,
            stage.num_epochs,
        )

    check_patterns(params, stage.trainable, f"stages.{stage.name}.trainable")
    parts, params, patterns, lr_scales, lora_dropout = prepare_lora_stage(cfg, stage, parts, params, mesh, rules)
    tx, schedule = make_optimizer(stage, total, lr_scales)
    state, frozen, state_sh, f_sh = init_stage_state(parts, params, patterns, tx, mesh, seed=cfg.seed)

    ckpt = TrainCheckpointer(
        os.path.join(stage_dir, "checkpoints"), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    start = 0
    latest = ckpt.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        ckpt.close()
        raise TrainingError(
            f"stage {stage.name}: {ckpt.directory} holds checkpoints (newest: step {latest}) but "
            f"checkpoint.resume=false: choose another run `name`, delete that folder, or resume"
        )
    if latest is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        state, data_state = ckpt.restore(latest, abstract)
        state = TrainState(*state) if not isinstance(state, TrainState) else state
        if data_state is not None:
            loader.set_state(data_state)
        start = latest
        log.info("stage %s: resumed from step %d", stage.name, latest)

    prefix = stage_shared_prefix(cfg, data_cfg, tokenizer, parts.config)
    run = StageRun(
        stage.name,
        start,
        StageResult(stage.name, final_dir, start, packing_estimate=packing_estimate),
        MetricsWriter(cfg.run_dir, cfg.logging, stage.name),
        ckpt,
        StopSignals(cfg.checkpoint.save_on_signal),
        cfg.train.nan_policy,
        jax.device_count(),
        cfg.train.peak_tflops or device_peak_tflops(jax.devices()[0]),
    )
    profiler = StepProfiler(cfg.train.profile_steps, os.path.join(stage_dir, "profile"))
    step_fns: dict = {}  # with / without a shared prefix: (jitted step, batch shardings)
    llm_trainable = any(p.startswith("llm") for p in stage.trainable)
    procs = jax.process_count()
    if cfg.logging.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm

        run.bar = tqdm(total=total, initial=start, desc=stage.name, dynamic_ncols=True, leave=True)

    try:
        while run.step < total:
            try:
                local = next(loader)
            except StopIteration:
                log.warning("stage %s: data ended after %d of %d steps", stage.name, run.step, total)
                break
            local, shared = common_batch(local, prefix)
            if prefix is not None and shared is None:
                run.unshared += 1
                if run.unshared == 1:
                    log.warning(
                        "stage %s: step %d: a batch does not start with the shared prefix "
                        "in every row; such batches run whole (counted in the summary)",
                        stage.name,
                        run.step + 1,
                    )
            micro = hooks.batch(run, stack_micro(shared or local, accum))
            key = shared is not None
            if key not in step_fns:
                b_sh = batch_shardings(mesh, rules, global_shape_example(micro))
                step_fns[key] = (
                    compile_train_step(
                        parts.graphdef,
                        tx,
                        schedule,
                        state_shardings=state_sh,
                        frozen_shardings=f_sh,
                        batch_shardings=b_sh,
                        packed=bool(data_cfg.packing),
                        lora_dropout=lora_dropout,
                    ),
                    b_sh,
                )
            step_fn, b_sh = step_fns[key]
            gb = to_global(micro, b_sh)
            profiler.before(run.step + 1)
            with S.activation_sharding(mesh, rules):
                state, metrics = step_fn(state, frozen, gb)
            run.step += 1
            profiler.after(run.step, (state, metrics))
            B, T = (shared or local)["input_ids"].shape
            flops = step_flops(
                parts.config,
                B * procs,
                T,
                int(local["image_valid"].sum()) * procs,
                llm_trainable=llm_trainable,
                head_tokens=head_tokens(parts.config, local, procs),
            )
            if shared is not None:  # the prefix, once per micro-batch (its attention to the rows' keys aside)
                flops += accum * step_flops(parts.config, 1, len(prefix), 0, llm_trainable=llm_trainable, head_tokens=0)
            run.window.add(run.step, metrics, int(local["attention_mask"].sum()) * procs, flops)
            if run.bar is not None:
                run.bar.update(1)
            save_now = bool(cfg.checkpoint.every_steps) and run.step % cfg.checkpoint.every_steps == 0
            sync_point = run.step % cfg.logging.every_steps == 0 or save_now
            hooks.after_step(run)
            stop = stop_requested(run.signals, sync_point)
            if sync_point or stop:
                run.flush()
            if stop:  # preemption: save this step now, then leave
                ckpt.save(run.step, state, loader.get_state(), force=True)
                ckpt.wait()
                run.result.interrupted = run.signals.hit or "signal on another process"
                break
            if save_now and run.step < total:
                ckpt.save(run.step, state, loader.get_state())
        run.flush()
        if run.result.interrupted is None:
            ckpt.save(run.step, state, loader.get_state(), force=True)
        ckpt.wait()
    finally:
        profiler.close()
        run.signals.restore()
        run.writer.close()
        ckpt.close()
        if run.bar is not None:
            run.bar.close()
        run.result.data_stats = loader.stats()
        run.result.shared_prefix_tokens = 0 if prefix is None else len(prefix)
        run.result.unshared_batches = run.unshared
        loader.close()
    result = run.result
    result.steps = run.step
    final = combine(state.trainable, frozen)
    if result.interrupted is None:
        save_pretrained(final, parts.config, final_dir, overwrite=True)
    result.seconds = time.time() - t_start
    return final, result


def run_training(cfg: RunConfig, *, tokenizer=None, hooks: TrainHooks | None = None) -> list[StageResult]:
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
    for stage in cfg.stages:
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
            params = load_stage_init(params, stage, parts, mesh, rules)
        params, res = run_stage(cfg, stage, parts, params, mesh, rules, tokenizer=tokenizer, hooks=hooks)
        results.append(res)
        if res.interrupted:
            break
    return results
