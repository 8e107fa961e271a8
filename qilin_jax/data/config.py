"""The `data:` section of the run config: where the samples are, how they become tokens and
pixels, and how they are batched, ordered and loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from qilin_jax.data.conversation import TEMPLATES
from qilin_jax.data.images import IMAGE_MODES
from qilin_jax.data.prompts import PROMPT_MODES
from qilin_jax.data.sources import PMC_STYLES, SOURCE_FORMATS


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
    max_length: int | None = 2048
    # --- images
    image_mode: str = "pad"  # square (stage 1: resize + centre crop) | pad (stage 2: mean canvas)
    image_size: int = 336
    patch_size: int = 14
    image_tokens: int | None = None  # None = (image_size // patch_size) ** 2 = 576
    image_token_id: int | None = None  # None = tokenizer's "<image>" id, else len(tokenizer)
    composite: bool = True  # several images of one sample -> one composite (paper 3.3)
    composite_max: int = 4  # samples with more images are skipped ("too_many_images")
    dicom_window_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    jpeg_draft_size: int | None = None  # e.g. 672: fast DCT-scaled JPEG decode (not bit-exact)
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
    images_per_row: int | None = None  # I; None = 1 (composite) or composite_max unpacked,
    # pack_length // (image_tokens + 16) packed
    drop_remainder: bool = True  # drop a final partial batch (else pad it with empty rows)
    # --- order
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1  # None = repeat forever (multi-host: let training count steps)
    # --- execution
    worker_count: int = 0  # decode worker processes (0 = in this process)
    worker_buffer_size: int = 4  # elements each worker prepares ahead
    read_threads: int = 1  # threads per process reading/decoding (0 = synchronous)
    prefetch_buffer: int = 8
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it

    @classmethod
    def from_dict(cls, d: dict, where: str = "data") -> DataConfig:
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
        check(self.template in TEMPLATES, "template", f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        check(self.prompt_mode in PROMPT_MODES, "prompt_mode", f"must be one of {PROMPT_MODES}")
        check(self.prompt_language in ("zh", "en"), "prompt_language", "must be zh or en")
        check(self.pmc_vqa_style in PMC_STYLES, "pmc_vqa_style", f"must be one of {PMC_STYLES}")
        check(self.pmc_vqa_language in ("zh", "en"), "pmc_vqa_language", "must be zh or en")
        check(self.image_mode in IMAGE_MODES, "image_mode", f"must be one of {IMAGE_MODES}")
        check(self.image_size > 0, "image_size", "must be > 0")
        check(self.patch_size > 0, "patch_size", "must be > 0")
        check(self.resolved_image_tokens() > 0, "image_tokens", "must be > 0")
        check(1 <= self.composite_max, "composite_max", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        b = list(self.seq_buckets)
        check(
            len(b) > 0 and all(int(x) > 0 for x in b) and b == sorted(b),
            "seq_buckets",
            f"must be a non-empty increasing list, got {b}",
        )
        check(self.max_length is None or self.max_length > 0, "max_length", "must be > 0 or null")
        check(
            self.row_length() > self.resolved_image_tokens() + 2,
            "pack_length" if self.packing else "seq_buckets",
            f"the longest row ({self.row_length()}) cannot hold one image "
            f"({self.resolved_image_tokens()} tokens): raise seq_buckets / pack_length",
        )
        check(
            self.image_slots() >= (1 if self.composite else self.composite_max),
            "images_per_row",
            "too small for one sample's images (composite off: >= composite_max)",
        )
        check(self.pack_buffer >= 1, "pack_buffer", "must be >= 1")
        check(
            not (self.group_by_length and self.packing),
            "group_by_length",
            "group_by_length applies to unpacked rows (packing already fills each row): "
            "set one of group_by_length / packing",
        )
        check(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be >= 1 or null")
        check(self.worker_count >= 0, "worker_count", "must be >= 0")
        check(self.read_threads >= 0, "read_threads", "must be >= 0")
        check(len(self.dicom_window_percentiles) == 2, "dicom_window_percentiles", "must be [low, high]")

    def fingerprint(self) -> str:
        """Returns a hash of the options that change which batches come out (checked on resume)."""
        keys = (
            "format",
            "paths",
            "split",
            "template",
            "prompt_mode",
            "max_length",
            "image_size",
            "batch_size",
            "seq_buckets",
            "packing",
            "pack_length",
            "pack_buffer",
            "images_per_row",
            "shuffle",
            "seed",
            "num_epochs",
            "composite",
            "composite_max",
        )
        d = {k: getattr(self, k) for k in keys}
        d["paths"] = [os.path.basename(str(x).rstrip("/")) for x in self.paths]  # mount-agnostic
        if self.group_by_length:  # only when on: states saved before the option still resume
            d["group_by_length"] = True
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
