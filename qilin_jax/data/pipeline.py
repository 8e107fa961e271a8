"""The Grain loader: records -> samples (image + tokens + labels) -> fixed-shape batches.

    MapDataset.range(n) -> shard by process -> shuffle(seed, reshuffled each epoch) -> repeat
      -> map: read row, check, prompt, tokenize, decode/composite/resize images   (workers)
      -> drop and count bad samples, epoch summaries                              (main)
      -> rows: one sample per row, or packed (best-fit over a buffer)             (main)
      -> batches of B rows padded to a bucket length                              (main)

The element order never depends on `worker_count` (Grain interleaves the per-worker slices
round-robin and the filtering happens after the workers), and the iterator state is a JSON
dict, so `set_state(get_state())` resumes with the exact next batch.

The stages live beside this module: `config` (DataConfig), `processor` (one sample),
`grain_ops` (the main-process iterators), `packing` (rows, buckets, collation).

Batch (numpy, fixed shapes):
  input_ids int32 [B, T] (image positions hold image_token_id, pad 0), labels int32 [B, T]
  (-100 ignored, not shifted), attention_mask / segment_ids / position_ids int32 [B, T],
  pixel_values float32 [B, I, 3, H, W] (slot k of a row = its k-th image in token order,
  unused slots zero), image_valid int32 [B, I].
"""

from __future__ import annotations

import json
import logging

import grain

from qilin_jax.data.config import DataConfig
from qilin_jax.data.grain_ops import Batches, FilterSkips, Rows
from qilin_jax.data.packing import Collate
from qilin_jax.data.processor import SampleProcessor
from qilin_jax.data.sources import open_source

log = logging.getLogger("qilin_jax.data")


class Loader:
    """Iterator of batches with get_state()/set_state() (JSON), stats() and skip_summary()."""

    STATE_VERSION = 1

    def __init__(
        self,
        dataset,
        cfg: DataConfig,
        filter_ds,
        batches_ds,
        process_index,
        process_count,
        num_samples,
        source=None,
        tokenizer=None,
    ):
        self.cfg = cfg
        self.source, self.tokenizer = source, tokenizer  # for estimate_packed_rows
        self.dataset = dataset  # the grain IterDataset
        self._filter_ds = filter_ds
        self._batches_ds = batches_ds
        self.process_index = process_index
        self.process_count = process_count
        self.num_samples = num_samples  # source rows on this process per epoch
        self.iterator = iter(dataset)  # a grain DatasetIterator (Orbax save/load capable)

    def __iter__(self) -> Loader:
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
        return {
            "seen": it.seen,
            "kept": it.kept,
            "skipped": dict(it.skipped),
            "by_epoch": json.loads(json.dumps(it.by_epoch)),
            "examples": {k: list(v) for k, v in it.examples.items()},
        }

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
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer))
    if cfg.worker_count > 0:
        from absl import flags

        # Grain's worker start reads absl flags; outside an absl app they are never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    filt = FilterSkips(it)
    slots = cfg.image_slots()
    rows = Rows(
        filt,
        cfg.packing,
        cfg.row_length(),
        slots,
        cfg.pack_buffer,
        group_batch=cfg.batch_size if cfg.group_by_length else 0,
    )
    collate = Collate(
        cfg.batch_size, cfg.seq_buckets, slots, cfg.image_size, fixed_length=cfg.pack_length if cfg.packing else None
    )
    batches = Batches(rows, collate, cfg.batch_size, cfg.drop_remainder)
    return Loader(
        batches, cfg, filt, batches, process_index, process_count, per_process, source=source, tokenizer=tokenizer
    )
