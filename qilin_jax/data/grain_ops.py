"""The Grain iterators of the loader that run in the main process, after the workers: drop and
count bad samples (FilterSkips), form rows of one or several samples (Rows), pad rows into
fixed-shape batches (Batches). Each keeps a JSON state, so a resumed loader continues exactly."""

from __future__ import annotations

import json
import logging
import zlib

import grain
import numpy as np

from qilin_jax.data.errors import DataError
from qilin_jax.data.packing import plan_rows

log = logging.getLogger("qilin_jax.data")


class FilterSkipsIterator(grain.DatasetIterator):
    """Drops skip records, counts them by reason and epoch, logs a summary per epoch."""

    def __init__(self, parent):
        super().__init__(parent)
        self._reset_counts()

    def _reset_counts(self):
        self.seen = 0
        self.kept = 0
        self.skipped: dict[str, int] = {}
        self.by_epoch: dict[str, dict] = {}
        self.examples: dict[str, list] = {}
        self.epoch = 0

    def _epoch_entry(self, epoch):
        return self.by_epoch.setdefault(str(epoch), {"seen": 0, "skipped": {}})

    def _log_epoch(self, epoch):
        e = self.by_epoch.get(str(epoch))
        if e is None:
            return
        n_skip = sum(e["skipped"].values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(e["skipped"].items())) or "none"
        log.info("data epoch %d: %d samples read, %d skipped (%s)", epoch, e["seen"], n_skip, reasons)

    def __next__(self):
        while True:
            try:
                el = next(self._parent)
            except StopIteration:
                self._log_epoch(self.epoch)
                raise
            epoch = int(el.get("epoch", 0))
            if epoch != self.epoch:
                self._log_epoch(self.epoch)
                prev = self.by_epoch.get(str(self.epoch))
                if prev and prev["seen"] and sum(prev["skipped"].values()) == prev["seen"]:
                    # A repeating dataset whose every sample is bad would loop forever.
                    raise DataError(
                        "all_skipped",
                        (
                            f"every one of the {prev['seen']} samples of data epoch {self.epoch} was "
                            f"skipped: {prev['skipped']}; e.g. {next(iter(self.examples.values()))[:1]}"
                        ),
                    )
                self.epoch = epoch
            entry = self._epoch_entry(epoch)
            self.seen += 1
            entry["seen"] += 1
            if "skip" in el:
                r = el["skip"]
                self.skipped[r] = self.skipped.get(r, 0) + 1
                entry["skipped"][r] = entry["skipped"].get(r, 0) + 1
                ex = self.examples.setdefault(r, [])
                if len(ex) < 3:
                    ex.append(el.get("detail", ""))
                log.debug("skipped sample: %s", el.get("detail"))
                continue
            self.kept += 1
            return el

    def get_state(self):
        return {
            "parent": self._parent.get_state(),
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "by_epoch": json.loads(json.dumps(self.by_epoch)),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "epoch": self.epoch,
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.seen, self.kept = state["seen"], state["kept"]
        self.skipped = dict(state["skipped"])
        self.by_epoch = json.loads(json.dumps(state["by_epoch"]))
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        self.epoch = state["epoch"]


class FilterSkips(grain.IterDataset):
    def __init__(self, parent):
        super().__init__(parent)
        self.last_iterator = None

    def __iter__(self):
        it = FilterSkipsIterator(self._parent.__iter__())
        self.last_iterator = it
        return it


class RowsIterator(grain.DatasetIterator):
    """Emits rows (lists of samples): one sample each, packed by best-fit-decreasing, or one
    sample each in length-grouped order (`group_batch` > 0: batches of similar length)."""

    def __init__(self, parent, packing, capacity, image_slots, buffer, group_batch: int = 0):
        super().__init__(parent)
        self._packing = packing
        self._capacity = capacity
        self._slots = image_slots
        self._group_batch = 0 if packing else int(group_batch)
        if self._group_batch:  # whole batches per window, so batches never straddle windows
            buffer = max(self._group_batch, buffer // self._group_batch * self._group_batch)
        self._buffer = buffer
        self._rows: list = []
        self._group_state = None
        self._emitted = 0
        self._skip_rows = 0

    def _plan(self, group: list) -> list[list]:
        """The window's rows in emission order."""
        if self._packing:
            plan = plan_rows(
                [len(g["input_ids"]) for g in group],
                [g["pixel_values"].shape[0] for g in group],
                self._capacity,
                self._slots,
            )
            return [[group[i] for i in row] for row in plan]
        b = self._group_batch
        order = sorted(range(len(group)), key=lambda i: len(group[i]["input_ids"]))  # stable
        chunks = [order[i : i + b] for i in range(0, len(order), b)]
        full = [c for c in chunks if len(c) == b]
        # A seed from the window's contents: the same order again after a resume.
        ids = "\x00".join(str(g.get("id", "")) for g in group)
        rng = np.random.default_rng(zlib.crc32(ids.encode("utf-8")))
        shuffled = [full[i] for i in rng.permutation(len(full))]
        shuffled += [c for c in chunks if len(c) < b]  # a partial batch (end of data) stays last
        return [[group[i]] for c in shuffled for i in c]

    def __next__(self):
        if not self._packing and not self._group_batch:
            return [next(self._parent)]
        if not self._rows:
            self._group_state = self._parent.get_state()
            group = []
            for _ in range(self._buffer):
                try:
                    group.append(next(self._parent))
                except StopIteration:
                    break
            if not group:
                raise StopIteration
            self._rows = self._plan(group)
            self._emitted = 0
            if self._skip_rows:  # resuming inside a group
                self._rows = self._rows[self._skip_rows :]
                self._emitted = self._skip_rows
                self._skip_rows = 0
                if not self._rows:
                    return next(self)
        self._emitted += 1
        return self._rows.pop(0)

    def get_state(self):
        if not self._packing and not self._group_batch:
            return {"parent": self._parent.get_state()}
        if not self._rows:  # between groups
            return {"parent": self._parent.get_state(), "emitted": 0}
        return {"parent": self._group_state, "emitted": self._emitted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._rows = []
        self._group_state = None
        self._emitted = 0
        self._skip_rows = int(state.get("emitted", 0))


class Rows(grain.IterDataset):
    def __init__(self, parent, packing, capacity, image_slots, buffer, group_batch: int = 0):
        super().__init__(parent)
        self._args = (packing, capacity, image_slots, buffer, group_batch)

    def __iter__(self):
        return RowsIterator(self._parent.__iter__(), *self._args)


class BatchesIterator(grain.DatasetIterator):
    """Collects B rows and pads them into one fixed-shape batch; keeps padding statistics."""

    def __init__(self, parent, collate, batch_size, drop_remainder):
        super().__init__(parent)
        self._collate = collate
        self._b = batch_size
        self._drop = drop_remainder
        self.stats = {"batches": 0, "rows": 0, "samples": 0, "tokens": 0, "slots": 0, "images": 0, "image_slots": 0}

    def __next__(self):
        rows = []
        for _ in range(self._b):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        if not rows or (len(rows) < self._b and self._drop):
            raise StopIteration
        batch = self._collate(rows)
        s = self.stats
        s["batches"] += 1
        s["rows"] += len(rows)
        s["samples"] += sum(len(r) for r in rows)
        s["tokens"] += int(batch["attention_mask"].sum())
        s["slots"] += int(batch["attention_mask"].size)
        s["images"] += int(batch["image_valid"].sum())
        s["image_slots"] += int(batch["image_valid"].size)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "stats": dict(self.stats)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.stats = dict(state["stats"])


class Batches(grain.IterDataset):
    def __init__(self, parent, collate, batch_size, drop_remainder):
        super().__init__(parent)
        self._args = (collate, batch_size, drop_remainder)
        self.last_iterator = None

    def __iter__(self):
        it = BatchesIterator(self._parent.__iter__(), *self._args)
        self.last_iterator = it
        return it
