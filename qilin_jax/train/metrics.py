"""What the training loop records: per-step metrics (JSONL, TensorBoard, progress bar), the
throughput and MFU of the steps between two host syncs, and profiler traces."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from qilin_jax.data.conversation import IGNORE_INDEX

log = logging.getLogger("qilin_jax.train")


def head_tokens(config, batch: dict, processes: int = 1) -> int | None:
    """Positions the LM head runs on for a step whose host batch is `batch` (None = all, the
    usual MFU formula; with loss_supervised_only, the supervised ones, this host's times
    `processes`)."""
    if not config.loss_supervised_only or "labels" not in batch:
        return None
    return int((np.asarray(batch["labels"])[:, 1:] != IGNORE_INDEX).sum()) * processes


@dataclass
class StepWindow:
    """The steps dispatched since metrics were last fetched: their device metrics (fetched
    together, one host sync) and the tokens and FLOPs they processed."""

    pending: list = field(default_factory=list)  # (step, device metrics dict)
    t_start: float = field(default_factory=time.time)
    tokens: int = 0
    flops: float = 0.0

    def add(self, step: int, metrics, tokens: int, flops: float) -> None:
        """Queue a dispatched step's metrics and count its work."""
        self.pending.append((step, metrics))
        self.tokens += tokens
        self.flops += flops

    def fetch(self, n_devices: int, peak_tflops: float | None) -> list[tuple[int, dict]]:
        """(step, row) of every queued step, each row with the window's tokens/s, time per
        step and MFU (when the peak is known); starts a new window. [] when nothing is queued."""
        if not self.pending:
            return []
        fetched = jax.device_get([m for _, m in self.pending])
        dt = time.time() - self.t_start
        tps = self.tokens / dt if dt > 0 else 0.0
        mfu = (self.flops / dt / n_devices / (peak_tflops * 1e12)) if (peak_tflops and dt > 0) else None
        rows = []
        for (step, _), m in zip(self.pending, fetched):
            row = {k: float(v) for k, v in m.items() if k != "finite"}
            row["finite"] = bool(m["finite"])
            row["tokens_per_s"] = tps
            row["step_time_s"] = dt / len(self.pending)
            if mfu is not None:
                row["mfu"] = mfu
            rows.append((step, row))
        self.pending = []
        self.t_start = time.time()
        self.tokens = 0
        self.flops = 0.0
        return rows


def progress_postfix(row: dict) -> dict:
    """The progress bar's postfix for a logged row (loss, lr, gradient norm, tokens/s, MFU)."""
    post = dict(
        loss=f"{row['loss']:.4f}",
        lr=f"{row['lr']:.2e}",
        gnorm=f"{row['grad_norm']:.3f}",
        tok_s=f"{row['tokens_per_s']:,.0f}",
    )
    if "mfu" in row:
        post["mfu"] = f"{100 * row['mfu']:.1f}%"
    return post


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
