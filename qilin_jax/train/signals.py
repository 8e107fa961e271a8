"""Preemption: SIGTERM/SIGINT set a flag, and every process agrees on the step at which the
loop saves a checkpoint and stops."""

from __future__ import annotations

import signal

import jax

from qilin_jax.train.distributed import any_process


class StopSignals:
    """SIGTERM/SIGINT set `hit` (the signal's name) instead of killing the process; `restore()`
    puts the previous handlers back. Inert when not enabled."""

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


def stop_requested(signals: StopSignals, sync_point: bool) -> bool:
    """Whether to save and stop after this step. With several processes every one must take
    the same decision at the same step (a lone save or break would leave the others blocked
    in the next collective), so the flags are combined across processes, at the steps every
    process treats as sync points (logging/checkpoint steps) only: that costs no extra host
    synchronisation in between."""
    if jax.process_count() > 1 and not sync_point:
        return False
    return any_process(signals.hit is not None)
