"""`python -m tests.train_launcher --config X.yaml [overrides]`: main.py with fault-injection
hooks in the training loop, for the robustness tests (resume, preemption, NaN policy).

The hooks come from this process's environment (test code only; the product reads neither):
  QILIN_TEST_KILL_AT=[<stage>:]<step>:<phase>[:<SIGNAL>]   (SIGNAL default SIGKILL)
    after_step:  after optimizer step <step> was run and logged, wait for in-flight
                 checkpoint saves (before a SIGKILL), then send SIGNAL to this process
                 (SIGTERM = preemption: the run saves step <step> and stops).
    during_save: in the middle of writing the checkpoint of step <step> (the data item is
                 half written, the Orbax step directory still temporary), send SIGNAL.
  QILIN_TEST_NAN_AT=[<stage>:]<step>[,<step>...]: the batch of those steps gets NaN pixel
    values, so the loss and gradients are non-finite (exercises train.nan_policy).
Without them it is exactly main.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import numpy as np

KILL_ENV = "QILIN_TEST_KILL_AT"
NAN_ENV = "QILIN_TEST_NAN_AT"
KILL_PHASES = ("after_step", "during_save")

log = logging.getLogger("qilin_jax.train")


def _for_stage(text: str) -> tuple[str | None, str]:
    """(stage or None for every stage, rest) of a hook value "[<stage>:]rest"."""
    head, sep, rest = text.partition(":")
    if sep and not head.strip().lstrip("-").isdigit():
        return head.strip(), rest
    return None, text


def parse_kill(value: str) -> tuple[str | None, int, str, signal.Signals]:
    """(stage, step, phase, signal) of a QILIN_TEST_KILL_AT value."""
    stage, rest = _for_stage(value)
    parts = rest.split(":")
    try:
        step, phase = int(parts[0]), parts[1]
        sig = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGKILL
    except (IndexError, ValueError, KeyError):
        raise ValueError(f"{KILL_ENV}={value!r}: expected [<stage>:]<step>:<phase>[:<SIGNAL>]") from None
    if phase not in KILL_PHASES:
        raise ValueError(f"{KILL_ENV}={value!r}: phase must be one of {KILL_PHASES}")
    return stage, step, phase, sig


def parse_nan(value: str) -> tuple[str | None, set[int]]:
    """(stage, steps) of a QILIN_TEST_NAN_AT value."""
    stage, rest = _for_stage(value)
    return stage, {int(x) for x in rest.split(",") if x.strip()}


def _half_write_and_kill(sig):
    """A data-item writer that writes half of the JSON, syncs it and sends `sig` to this process."""

    def write(path, text):
        with open(path, "w") as f:  # a half-written item inside the temporary step dir
            f.write(text[: len(text) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), sig)

    return write


def make_hooks(kill: str | None, nan: str | None):
    """Training-loop hooks (the methods of qilin_jax.train.loop.TrainHooks) that poison the
    batches of `nan` and send the signal of `kill`. Nothing of qilin_jax is imported here:
    main.py sets up logging before the libraries load."""
    kill_at = parse_kill(kill) if kill else None
    nan_at = parse_nan(nan) if nan else None

    def here(stage, run):
        return stage is None or stage == run.name

    class FaultHooks:
        def batch(self, run, micro):
            if nan_at and here(nan_at[0], run) and run.step + 1 in nan_at[1]:
                micro = {**micro, "pixel_values": np.full_like(micro["pixel_values"], np.nan)}
            return micro

        def after_step(self, run):
            if not kill_at or not here(kill_at[0], run) or kill_at[1] != run.step:
                return
            _, _, phase, sig = kill_at
            if phase == "during_save":
                run.ckpt.data_writer = _half_write_and_kill(sig)
                return
            run.flush()
            if sig == signal.SIGKILL:  # not for SIGTERM: with several processes the wait may sync hosts
                run.ckpt.wait()
            run.writer.flush()
            log.warning("test hook %s: sending %s to myself", KILL_ENV, sig.name)
            os.kill(os.getpid(), sig)
            deadline = time.time() + 10
            while run.signals.hit is None and time.time() < deadline:  # the handler runs between bytecodes
                time.sleep(0.01)

    return FaultHooks()


if __name__ == "__main__":
    import main

    hooks = make_hooks(os.environ.get(KILL_ENV), os.environ.get(NAN_ENV))
    sys.exit(main.main(sys.argv[1:], train_hooks=hooks))
