"""The Grain loader: records -> samples (image + tokens + labels) -> fixed-shape batches.

    MapDataset.range(n) -> shard by process -> shuffle(seed, reshuffled each epoch) -> repeat
      -> map: read row, check, prompt, tokenize, decode/composite/resize images   (workers)
      -> drop and count bad samples, epoch summaries                              (main)
      -> rows: one sample per row, or packed (best-fit over a buffer)             (main)
      -> batches of B rows padded to a bucket length                              (main)

The element order never depends on `worker_count` (Grain interleaves the per-worker slices
round-robin and the filtering happens after the workers), and the iterator state is a JSON
dict, so `set_state(get_state())` resumes with the exact next batch.

Batch (numpy, fixed shapes):
  input_ids int32 [B, T] (image positions hold image_token_id, pad 0), labels int32 [B, T]
  (-100 ignored, not shifted), attention_mask / segment_ids / position_ids int32 [B, T],
  pixel_values float32 [B, I, 3, H, W] (slot k of a row = its k-th image in token order,
  unused slots zero), image_valid int32 [B, I].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Optional

import grain
import numpy as np

from qilin_jax.data import images as images_lib
from qilin_jax.data.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    prepare_conversation,
    default_image_token_id,
    tokenize_conversation,
    validate_conversation,
)
from qilin_jax.data.errors import DataError
from qilin_jax.data.prompts import PROMPT_MODES, apply_prompt
from qilin_jax.data.sources import PMC_STYLES, SOURCE_FORMATS, open_source, row_to_sample

log = logging.getLogger("qilin_jax.data")


@dataclass
class DataConfig:
    """All data options; the `data:` section of the YAML config. Every field has a default."""

    # --- where the data is
    format: str = "llava_json"  # llava_json | pmc_vqa_csv | tfds
    paths: list[str] = field(default_factory=list)  # JSON/JSONL/CSV files, or built TFDS dataset dirs
    image_folder: str = ""  # root for relative image names (not used by tfds: images inside)
    split: str = "train"  # tfds split
    pmc_vqa_style: str = "choice"  # choice (answer = letter) | open (answer = text)
    pmc_vqa_language: str = "en"  # language of the multiple-choice instruction: en | zh
    # --- text
    template: str = "v1"  # plain (stage 1) | v1 (stage 2) | llava_v1 | llava_llama_2
    prompt_mode: str = "none"  # none | alignment | instruction: rewrite the first human turn
    prompt_language: str = "zh"  # with a paper prompt (Appendix A.1) drawn per sample from seed
    move_image_to_front: bool = True  # LLaVA preprocess_multimodal: "<image>\n" + text
    # Release semantics: text tokens with each image counted as ONE token are cut to this
    # (2048 = model_max_length), so expanded sequences reach 2047 + 576. None = no text cap.
    max_length: Optional[int] = 2048
    # --- images
    image_mode: str = "pad"  # square (stage 1: resize + centre crop) | pad (stage 2: mean canvas)
    image_size: int = 336
    patch_size: int = 14
    image_tokens: Optional[int] = None  # None = (image_size // patch_size) ** 2 = 576
    image_token_id: Optional[int] = None  # None = tokenizer's "<image>" id, else len(tokenizer)
    composite: bool = True  # several images of one sample -> one composite (paper 3.3)
    composite_max: int = 4  # samples with more images are skipped ("too_many_images")
    dicom_window_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    jpeg_draft_size: Optional[int] = None  # e.g. 672: fast DCT-scaled JPEG decode (not bit-exact)
    # --- batches
    batch_size: int = 16  # rows per batch on this process
    seq_buckets: list[int] = field(default_factory=lambda: [768, 1024, 1536, 2048, 2688])
    packing: bool = False  # several samples per row (segment_ids, per-segment positions)
    # Packed rows are all this long (one compiled shape). 4096 holds ~6 ChiMed-VL samples
    # (576 image tokens + ~100 text) with ~5-8% padding; 2688 holds 4 with 7-11%.
    pack_length: int = 4096
    pack_buffer: int = 256  # samples planned together by the packer (more = less padding)
    # Unpacked rows: batches of similar length (HF `group_by_length`, LLaVA's
    # `group_by_modality_length`): each window of pack_buffer samples (rounded down to a
    # multiple of batch_size) is sorted by length and cut into batches, whose order is then
    # shuffled (seeded by the window's sample ids). With seq_buckets, less padding per batch.
    group_by_length: bool = False
    images_per_row: Optional[int] = None  # I; None = 1 (composite) or composite_max unpacked,
    # pack_length // (image_tokens + 16) packed
    drop_remainder: bool = True  # drop a final partial batch (else pad it with empty rows)
    # --- order
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = 1  # None = repeat forever (multi-host: let training count steps)
    # --- execution
    worker_count: int = 0  # decode worker processes (0 = in this process)
    worker_buffer_size: int = 4  # elements each worker prepares ahead
    read_threads: int = 1  # threads per process reading/decoding (0 = synchronous)
    prefetch_buffer: int = 8
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it

    @classmethod
    def from_dict(cls, d: dict, where: str = "data") -> "DataConfig":
        """Returns a validated DataConfig from a plain dict; unknown keys, wrong types and
        impossible combinations raise ConfigError naming the key (`data.batch_size`)."""
        from qilin_jax.config_parse import parse_dataclass

        cfg = parse_dataclass(cls, d, where)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict:
        """Returns the config as a plain dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)

    # Derived values ---------------------------------------------------------------------------
    def resolved_image_tokens(self) -> int:
        """Returns image_tokens, derived from image_size / patch_size when None."""
        if self.image_tokens is not None:
            return int(self.image_tokens)
        return (self.image_size // self.patch_size) ** 2

    def row_length(self) -> int:
        """Returns the longest row: pack_length when packing, else the largest bucket."""
        if self.packing:
            return int(self.pack_length)
        return int(max(self.seq_buckets))

    def image_slots(self) -> int:
        """Returns I, the image slots per row."""
        if self.images_per_row is not None:
            return int(self.images_per_row)
        per_sample = 1 if self.composite else self.composite_max
        if not self.packing:
            return per_sample
        return max(per_sample, self.row_length() // (self.resolved_image_tokens() + 16))

    def validate(self, where: str = "data") -> None:
        """Raises ConfigError naming the first bad option (`data.template`) and its allowed values."""
        from qilin_jax.config_parse import FieldError

        def check(ok, key, msg):
            if not ok:
                raise FieldError(f"{where}.{key}", msg)

        check(self.format in SOURCE_FORMATS, "format", f"must be one of {SOURCE_FORMATS}, got {self.format!r}")
        check(self.template in TEMPLATES, "template",
              f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        check(self.prompt_mode in PROMPT_MODES, "prompt_mode", f"must be one of {PROMPT_MODES}")
        check(self.prompt_language in ("zh", "en"), "prompt_language", "must be zh or en")
        check(self.pmc_vqa_style in PMC_STYLES, "pmc_vqa_style", f"must be one of {PMC_STYLES}")
        check(self.pmc_vqa_language in ("zh", "en"), "pmc_vqa_language", "must be zh or en")
        check(self.image_mode in images_lib.IMAGE_MODES, "image_mode",
              f"must be one of {images_lib.IMAGE_MODES}")
        check(self.image_size > 0, "image_size", "must be > 0")
        check(self.patch_size > 0, "patch_size", "must be > 0")
        check(self.resolved_image_tokens() > 0, "image_tokens", "must be > 0")
        check(1 <= self.composite_max, "composite_max", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        b = list(self.seq_buckets)
        check(len(b) > 0 and all(int(x) > 0 for x in b) and b == sorted(b), "seq_buckets",
              f"must be a non-empty increasing list, got {b}")
        check(self.max_length is None or self.max_length > 0, "max_length", "must be > 0 or null")
        check(self.row_length() > self.resolved_image_tokens() + 2, "pack_length" if self.packing else "seq_buckets",
              f"the longest row ({self.row_length()}) cannot hold one image "
              f"({self.resolved_image_tokens()} tokens): raise seq_buckets / pack_length")
        check(self.image_slots() >= (1 if self.composite else self.composite_max), "images_per_row",
              "too small for one sample's images (composite off: >= composite_max)")
        check(self.pack_buffer >= 1, "pack_buffer", "must be >= 1")
        check(not (self.group_by_length and self.packing), "group_by_length",
              "group_by_length applies to unpacked rows (packing already fills each row): "
              "set one of group_by_length / packing")
        check(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be >= 1 or null")
        check(self.worker_count >= 0, "worker_count", "must be >= 0")
        check(self.read_threads >= 0, "read_threads", "must be >= 0")
        check(len(self.dicom_window_percentiles) == 2, "dicom_window_percentiles", "must be [low, high]")

    def fingerprint(self) -> str:
        """Returns a hash of the options that change which batches come out (checked on resume)."""
        keys = ("format", "paths", "split", "template", "prompt_mode", "max_length", "image_size",
                "batch_size", "seq_buckets", "packing", "pack_length", "pack_buffer",
                "images_per_row", "shuffle", "seed", "num_epochs", "composite", "composite_max")
        d = {k: getattr(self, k) for k in keys}
        d["paths"] = [os.path.basename(str(x).rstrip("/")) for x in self.paths]  # mount-agnostic
        if self.group_by_length:  # only when on: states saved before the option still resume
            d["group_by_length"] = True
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# One sample


class SampleProcessor:
    """Turns a source index into a sample dict, or a skip record {"skip": reason, ...}."""

    def __init__(self, cfg: DataConfig, tokenizer, source, epoch_length: int,
                 decode_images: bool = True):
        self.cfg = cfg
        self.decode_images = decode_images  # False: only check image files exist (fast audit)
        self.tokenizer = tokenizer
        self.source = source
        self.epoch_length = max(1, epoch_length)
        self.image_tokens = cfg.resolved_image_tokens()
        self.image_token_id = (
            cfg.image_token_id if cfg.image_token_id is not None else default_image_token_id(tokenizer)
        )
        self.row_length = cfg.row_length()

    def process(self, index: int) -> dict:
        """Returns {"input_ids", "labels", "pixel_values", "id"} for source row `index`; raises DataError."""
        cfg = self.cfg
        item = self.source[index]
        sample_id, refs, names, conversations = row_to_sample(
            item, getattr(self.source, "image_folder", cfg.image_folder) or cfg.image_folder,
            pmc_style=cfg.pmc_vqa_style, pmc_language=cfg.pmc_vqa_language,
        )
        conversations = validate_conversation(conversations)
        if cfg.prompt_mode != "none":
            conversations = apply_prompt(
                conversations, cfg.prompt_mode, seed=cfg.seed, key=index, language=cfg.prompt_language
            )
        conversations = prepare_conversation(
            conversations, len(refs), composite=cfg.composite, composite_max=cfg.composite_max,
            move_image_to_front=cfg.move_image_to_front,
        )
        n_img = (1 if refs else 0) if cfg.composite else len(refs)
        limit = self.row_length
        if cfg.max_length is not None:
            limit = min(limit, cfg.max_length + n_img * (self.image_tokens - 1))
        ids, labels = tokenize_conversation(
            conversations, self.tokenizer, cfg.template, self.image_tokens,
            self.image_token_id, max_length=limit,
        )
        if not self.decode_images:
            for r in refs:
                if isinstance(r, str) and not os.path.exists(r):
                    raise DataError("missing_image", f"image file not found: {r} (check image_folder)")
            return {"input_ids": ids, "labels": labels, "id": sample_id,
                    "pixel_values": np.zeros((n_img, 3, 1, 1), np.float32)}
        pixels = images_lib.load_and_preprocess(
            refs, names, size=cfg.image_size, mode=cfg.image_mode, composite=cfg.composite,
            composite_max=cfg.composite_max, dicom_percentiles=tuple(cfg.dicom_window_percentiles),
            draft_size=cfg.jpeg_draft_size,
        )
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "id": sample_id}

    def describe(self, index: int) -> str:
        """Returns 'file:line (id ...)' for error messages."""
        try:
            item = self.source[index]
            row = item.get("row")
            sid = row.get("id") if isinstance(row, dict) else None
            return f"{item.get('origin', '?')} (source index {index}" + (f", id {sid!r})" if sid else ")")
        except Exception:  # describing must never fail
            return f"source index {index}"

    def __call__(self, position: int, index: int) -> dict:
        epoch = int(position // self.epoch_length)
        try:
            out = self.process(int(index))
        except DataError as e:
            where = self.describe(int(index))
            if self.cfg.strict:
                raise DataError(
                    e.reason, f"{where}: {e} [{e.reason}; set data.strict=false to skip and count such samples]"
                ) from e
            return {"skip": e.reason, "detail": f"{where}: {e}", "epoch": epoch, "index": int(index)}
        out["epoch"] = epoch
        out["index"] = int(index)
        return out


# ----------------------------------------------------------------------------------------------
# Grain iterators that run in the main process


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
                    raise DataError("all_skipped", (
                        f"every one of the {prev['seen']} samples of data epoch {self.epoch} was "
                        f"skipped: {prev['skipped']}; e.g. {next(iter(self.examples.values()))[:1]}"))
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
            "seen": self.seen, "kept": self.kept, "skipped": dict(self.skipped),
            "by_epoch": json.loads(json.dumps(self.by_epoch)),
            "examples": {k: list(v) for k, v in self.examples.items()}, "epoch": self.epoch,
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
                self._capacity, self._slots,
            )
            return [[group[i] for i in row] for row in plan]
        b = self._group_batch
        order = sorted(range(len(group)), key=lambda i: len(group[i]["input_ids"]))  # stable
        chunks = [order[i:i + b] for i in range(0, len(order), b)]
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
                self._rows = self._rows[self._skip_rows:]
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
        self.stats = {"batches": 0, "rows": 0, "samples": 0, "tokens": 0, "slots": 0,
                      "images": 0, "image_slots": 0}

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


# ----------------------------------------------------------------------------------------------
# Packing and collation


# Source samples `estimate_packed_rows` tokenizes (at least 4 packing windows' worth).
PACK_ESTIMATE_SAMPLES = 2048


def estimate_packed_rows(cfg: "DataConfig", tokenizer, source, max_samples: int = PACK_ESTIMATE_SAMPLES) -> dict:
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
        rows += len(plan_rows(lengths[j:j + buf], images[j:j + buf], cfg.row_length(), cfg.image_slots()))
    return {"rows_per_sample": rows / k, "samples_per_row": (len(lengths) / rows) if rows else 0.0,
            "sampled": int(k), "skipped": skipped, "whole_source": k == n}


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
            raise ValueError(f"sample of {L} tokens / {n} images does not fit a row "
                             f"({capacity} tokens, {image_slots} image slots)")
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
                out["input_ids"][r, pos:pos + n] = s["input_ids"]
                out["labels"][r, pos:pos + n] = s["labels"]
                out["segment_ids"][r, pos:pos + n] = k
                out["position_ids"][r, pos:pos + n] = np.arange(n, dtype=np.int32)
                pos += n
                m = s["pixel_values"].shape[0]
                if m:
                    out["pixel_values"][r, slot:slot + m] = s["pixel_values"]
                    out["image_valid"][r, slot:slot + m] = 1
                    slot += m
        out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
        return out


# ----------------------------------------------------------------------------------------------
# The loader


class Loader:
    """Iterator of batches with get_state()/set_state() (JSON), stats() and skip_summary()."""

    STATE_VERSION = 1

    def __init__(self, dataset, cfg: DataConfig, filter_ds, batches_ds, process_index, process_count,
                 num_samples, source=None, tokenizer=None):
        self.cfg = cfg
        self.source, self.tokenizer = source, tokenizer  # for estimate_packed_rows
        self.dataset = dataset  # the grain IterDataset
        self._filter_ds = filter_ds
        self._batches_ds = batches_ds
        self.process_index = process_index
        self.process_count = process_count
        self.num_samples = num_samples  # source rows on this process per epoch
        self.iterator = iter(dataset)  # a grain DatasetIterator (Orbax save/load capable)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict:
        return next(self.iterator)

    def get_state(self) -> dict:
        """Returns a JSON-serialisable state; set_state(state) resumes at the exact next batch."""
        return {
            "version": self.STATE_VERSION,
            "fingerprint": self.cfg.fingerprint(),
            "process_index": self.process_index,
            "process_count": self.process_count,
            "grain": self.iterator.get_state(),
        }

    def set_state(self, state: dict) -> None:
        """Restores a state from get_state(); errors if it came from a different data setup."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {self.STATE_VERSION}")
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise ValueError(
                "the saved data loader state was made with different data options (paths, seed, "
                "batch_size, buckets, packing, ...); restore with the same data config or start "
                "the data from scratch"
            )
        if (state.get("process_index"), state.get("process_count")) != (self.process_index, self.process_count):
            raise ValueError(
                f"the saved data state is for process {state.get('process_index')}/"
                f"{state.get('process_count')}, this is {self.process_index}/{self.process_count}"
            )
        self.iterator.set_state(state["grain"])

    def _filter_it(self):
        return self._filter_ds.last_iterator

    def skip_summary(self) -> dict:
        """Returns {"seen", "kept", "skipped": {reason: n}, "by_epoch": {...}, "examples": {...}}."""
        it = self._filter_it()
        if it is None:
            return {"seen": 0, "kept": 0, "skipped": {}, "by_epoch": {}, "examples": {}}
        return {"seen": it.seen, "kept": it.kept, "skipped": dict(it.skipped),
                "by_epoch": json.loads(json.dumps(it.by_epoch)),
                "examples": {k: list(v) for k, v in it.examples.items()}}

    def stats(self) -> dict:
        """Returns batch statistics, including padding_fraction (pad slots / all token slots)."""
        it = self._batches_ds.last_iterator
        s = dict(it.stats) if it is not None else {}
        slots = s.get("slots", 0)
        s["padding_fraction"] = 1.0 - s.get("tokens", 0) / slots if slots else 0.0
        s["image_slot_fraction_used"] = (s.get("images", 0) / s["image_slots"]) if s.get("image_slots") else 0.0
        s["skipped"] = self.skip_summary()["skipped"]
        return s

    def close(self) -> None:
        """Stops worker processes."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


def make_loader(
    cfg: DataConfig | dict,
    tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> Loader:
    """Returns a Loader over cfg's source for this JAX process (batches of numpy arrays).

    tokenizer: a transformers tokenizer or a path for AutoTokenizer. process_index/count default
    to jax.process_index()/process_count(). source: an already opened source (tests).
    """
    if isinstance(cfg, dict):
        cfg = DataConfig.from_dict(cfg)
    cfg.validate()
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if source is None:
        source = open_source(cfg.format, cfg.paths, cfg.image_folder, cfg.split)
    n = len(source)
    per_process = n // process_count
    if per_process == 0:
        raise ValueError(f"{n} records cannot be shared by {process_count} processes")
    if n % process_count:
        log.info("dropping %d records so every process gets %d", n % process_count, per_process)
    processor = SampleProcessor(cfg, tokenizer, source, per_process)
    ds = grain.MapDataset.range(per_process * process_count)[process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map_with_index(processor)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
    )
    if cfg.worker_count > 0:
        from absl import flags

        # Grain's worker start reads absl flags; outside an absl app they are never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    filt = FilterSkips(it)
    slots = cfg.image_slots()
    rows = Rows(filt, cfg.packing, cfg.row_length(), slots, cfg.pack_buffer,
                group_batch=cfg.batch_size if cfg.group_by_length else 0)
    collate = Collate(cfg.batch_size, cfg.seq_buckets, slots, cfg.image_size,
                      fixed_length=cfg.pack_length if cfg.packing else None)
    batches = Batches(rows, collate, cfg.batch_size, cfg.drop_remainder)
    return Loader(batches, cfg, filt, batches, process_index, process_count, per_process,
                  source=source, tokenizer=tokenizer)
