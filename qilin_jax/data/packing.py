"""Rows and batches: best-fit packing of samples into rows, the packed-row estimate that sets a
packed stage's step count, sequence buckets, and the collator that pads rows into a batch."""

from __future__ import annotations

import numpy as np

from qilin_jax.data.config import DataConfig
from qilin_jax.data.conversation import IGNORE_INDEX
from qilin_jax.data.errors import DataError
from qilin_jax.data.processor import SampleProcessor

# Source samples `estimate_packed_rows` tokenizes (at least 4 packing windows' worth).
PACK_ESTIMATE_SAMPLES = 2048


def estimate_packed_rows(cfg: DataConfig, tokenizer, source, max_samples: int = PACK_ESTIMATE_SAMPLES) -> dict:
    """How many packed rows the loader makes per source sample, for step counting.

    Runs a seeded random sample of the source (all of it when it is small) through the loader's
    own per-sample code without decoding images (tokenization, templates, the checks that skip
    bad rows) and packs it with `plan_rows` in windows of `pack_buffer` samples, as the loader
    does. The sample is drawn from the whole source with `cfg.seed`, so every process of a
    multi-host run gets the same figure. Returns {"rows_per_sample", "samples_per_row",
    "sampled", "skipped", "whole_source"}; rows_per_sample counts skipped samples as samples
    (they make no row), so rows per epoch ~ source samples x rows_per_sample.
    """
    n = len(source)
    k = min(n, max(max_samples, 4 * cfg.pack_buffer))
    rng = np.random.default_rng(cfg.seed)
    order = np.arange(n) if k == n else np.sort(rng.choice(n, size=k, replace=False))
    order = rng.permutation(order)  # windows of a shuffled order, like the loader's
    proc = SampleProcessor(cfg, tokenizer, source, n, decode_images=False)
    lengths, images, skipped = [], [], 0
    for i in order:
        try:
            out = proc.process(int(i))
        except DataError:
            skipped += 1
            continue
        lengths.append(len(out["input_ids"]))
        images.append(out["pixel_values"].shape[0])
    rows, buf = 0, int(cfg.pack_buffer)
    for j in range(0, len(lengths), buf):
        rows += len(plan_rows(lengths[j : j + buf], images[j : j + buf], cfg.row_length(), cfg.image_slots()))
    return {
        "rows_per_sample": rows / k,
        "samples_per_row": (len(lengths) / rows) if rows else 0.0,
        "sampled": int(k),
        "skipped": skipped,
        "whole_source": k == n,
    }


def plan_rows(lengths, n_images, capacity: int, image_slots: int) -> list[list[int]]:
    """Returns rows as lists of sample indices: best-fit decreasing on tokens within image slots.

    Rows are returned in order of creation; within a row, samples keep their input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable for ties
    free: list[int] = []
    free_img: list[int] = []
    rows: list[list[int]] = []
    for i in order:
        L, n = lengths[i], n_images[i]
        if L > capacity or n > image_slots:
            raise ValueError(
                f"sample of {L} tokens / {n} images does not fit a row ({capacity} tokens, {image_slots} image slots)"
            )
        best, best_free = -1, capacity + 1
        for r in range(len(rows)):
            if free[r] >= L and free_img[r] >= n and free[r] - L < best_free:
                best, best_free = r, free[r] - L
                if best_free == 0:
                    break
        if best < 0:
            rows.append([i])
            free.append(capacity - L)
            free_img.append(image_slots - n)
        else:
            rows[best].append(i)
            free[best] -= L
            free_img[best] -= n
    return [sorted(r) for r in rows]


def bucket_for(length: int, buckets) -> int:
    """Returns the smallest bucket >= length (the largest if none is)."""
    for b in buckets:
        if length <= b:
            return int(b)
    return int(buckets[-1])


class Collate:
    """Pads B rows of samples into the fixed-shape batch dict (see the module docstring)."""

    def __init__(self, batch_size, buckets, image_slots, image_size, fixed_length=None):
        self.b = batch_size
        self.buckets = list(buckets)
        self.slots = image_slots
        self.size = image_size
        self.fixed_length = fixed_length

    def __call__(self, rows: list[list[dict]]) -> dict:
        lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
        t = self.fixed_length or bucket_for(max(lengths), self.buckets)
        b, slots, size = self.b, self.slots, self.size
        out = {
            "input_ids": np.zeros((b, t), np.int32),
            "labels": np.full((b, t), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "segment_ids": np.zeros((b, t), np.int32),
            "position_ids": np.zeros((b, t), np.int32),
            "pixel_values": np.zeros((b, slots, 3, size, size), np.float32),
            "image_valid": np.zeros((b, slots), np.int32),
        }
        for r, row in enumerate(rows):
            pos, slot = 0, 0
            for k, s in enumerate(row, 1):
                n = len(s["input_ids"])
                out["input_ids"][r, pos : pos + n] = s["input_ids"]
                out["labels"][r, pos : pos + n] = s["labels"]
                out["segment_ids"][r, pos : pos + n] = k
                out["position_ids"][r, pos : pos + n] = np.arange(n, dtype=np.int32)
                pos += n
                m = s["pixel_values"].shape[0]
                if m:
                    out["pixel_values"][r, slot : slot + m] = s["pixel_values"]
                    out["image_valid"][r, slot : slot + m] = 1
                    slot += m
        out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
        return out
