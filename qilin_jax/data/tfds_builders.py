"""Shared logic of the TFDS builders in data/chimed_vl and data/pmc_vqa.

The builders turn a manual_dir (the released JSON/CSV files plus an image folder) into
array_record files holding each sample's text and its *encoded* image files (JPEG/PNG/DICOM
bytes exactly as on disk), so training reads one file per shard instead of millions of small
files. Reading back needs no TensorFlow: `tfds.data_source` / `TfdsSource`.

Build-time checks are structural (fields, UTF-8, image file present and non-empty); a row
that fails is skipped, counted by reason and listed in the log (first examples) and in the
dataset's metadata. Decisions that depend on the training config (image count vs tags,
composite_max, truncation) are made when loading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qilin_jax.data.conversation import validate_conversation
from qilin_jax.data.errors import DataError
from qilin_jax.data.sources import LlavaJsonSource, PmcVqaCsvSource, row_to_sample

log = logging.getLogger("qilin_jax.data.tfds")

CHIMED_VL_FILES = {
    "alignment": ("ChiMed-VL-Alignment.jsonl", "ChiMed-VL-Alignment.json"),
    "instruction": ("ChiMed-VL-Instruction.json", "ChiMed-VL-Instruction.jsonl"),
    "chat": ("ChiMed-VL-Chat.json", "ChiMed-VL-Chat.jsonl"),
}
PMC_VQA_SPLITS = {"train": "train.csv", "test": "test.csv", "test_clean": "test_clean.csv"}

CHIMED_VL_MANUAL = """\
Put into the manual_dir (default ~/tensorflow_datasets/downloads/manual, or --manual_dir):
  ChiMed-VL-Alignment.jsonl, ChiMed-VL-Instruction.json, ChiMed-VL-Chat.json
    (the text released with Qilin-Med-VL; only the files of the configs you build are needed)
  images/   the PMC-OA figure files the rows name (e.g. PMC8253873_Fig6_46.jpg), flat;
            a symlink to the unpacked PMC-OA image folder is fine.
See docs/data.md for the download steps."""

PMC_VQA_MANUAL = """\
Put into the manual_dir: train.csv and/or test.csv / test_clean.csv from PMC-VQA, and
images/ with the figures they name (Figure_path), i.e. the unpacked images.zip.
See docs/data.md."""


def chimed_vl_features():
    """Returns the FeaturesDict of chimed_vl (text + encoded image bytes)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "origin": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_names": tfds.features.Sequence(tfds.features.Text()),
            "conversations": tfds.features.Text(),  # the LLaVA turn list as JSON
        }
    )


def pmc_vqa_features():
    """Returns the FeaturesDict of pmc_vqa (one encoded image per question)."""
    import tensorflow_datasets as tfds

    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "origin": text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_name": text(),
            "question": text(),
            "answer": text(),
            "choice_a": text(),
            "choice_b": text(),
            "choice_c": text(),
            "choice_d": text(),
            "answer_label": text(),
        }
    )


def find_image_dir(manual_dir: str | os.PathLike) -> str:
    """Returns manual_dir/images if it exists, else manual_dir."""
    d = Path(manual_dir) / "images"
    return str(d if d.is_dir() else Path(manual_dir))


def chimed_vl_file(manual_dir: str | os.PathLike, config: str) -> str:
    """Returns the path of the config's released file in manual_dir, or raises naming the names tried."""
    for name in CHIMED_VL_FILES[config]:
        p = Path(manual_dir) / name
        if p.exists():
            return str(p)
    raise FileNotFoundError(
        f"chimed_vl/{config}: none of {CHIMED_VL_FILES[config]} in manual_dir {manual_dir}.\n" + CHIMED_VL_MANUAL
    )


def _read_bytes(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError("missing_image", f"image file not found: {path}") from None
    except OSError as e:
        raise DataError("missing_image", f"cannot read {path}: {e}") from None
    if not data:
        raise DataError("corrupt_image", f"image file is empty: {path}")
    return data


class SkipCounter:
    """Counts skipped rows by reason; keeps a few examples for the log and the metadata."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.kept = 0

    def skip(self, err: DataError, where: str) -> None:
        if self.strict:
            raise DataError(err.reason, f"{where}: {err}") from err
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < 5:
            ex.append(f"{where}: {err}")

    def summary(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.counts), "examples": self.examples}

    def log(self, name: str) -> None:
        s = sum(self.counts.values())
        log.warning("%s: kept %d rows, skipped %d %s", name, self.kept, s, self.counts or "")
        for reason, ex in self.examples.items():
            for e in ex:
                log.warning("  skipped (%s) %s", reason, e)


def generate_chimed_vl(json_path: str, image_dir: str, counter: SkipCounter) -> Iterator[tuple[str, dict]]:
    """Yields (key, example) for every usable row of a ChiMed-VL/LLaVA JSON or JSONL file."""
    source = LlavaJsonSource([json_path], image_dir)
    for i in range(len(source)):
        item = source[i]
        where = item["origin"]
        try:
            sample_id, refs, names, conversations = row_to_sample(item, image_dir)
            validate_conversation(conversations)
            images = [_read_bytes(r) for r in refs]
        except DataError as e:
            counter.skip(e, where)
            continue
        counter.kept += 1
        yield (
            where,
            {
                "id": sample_id or where,
                "origin": where,
                "images": images,
                "image_names": names,
                "conversations": json.dumps(conversations, ensure_ascii=False),
            },
        )


def generate_pmc_vqa(csv_path: str, image_dir: str, counter: SkipCounter) -> Iterator[tuple[str, dict]]:
    """Yields (key, example) for every usable row of a PMC-VQA CSV file."""
    source = PmcVqaCsvSource([csv_path], image_dir)
    for i in range(len(source)):
        item = source[i]
        row, where = item["row"], item["origin"]
        try:
            _, refs, names, _ = row_to_sample(item, image_dir, pmc_style="open")
            image = _read_bytes(refs[0])
            for k in ("Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"):
                v = row.get(k) or ""
                v.encode("utf-8")
        except UnicodeEncodeError:
            counter.skip(DataError("not_utf8", "text is not valid UTF-8"), where)
            continue
        except DataError as e:
            counter.skip(e, where)
            continue
        counter.kept += 1
        answer = row.get("Answer") or row.get("Anwser") or ""
        yield (
            where,
            {
                "origin": where,
                "image": image,
                "image_name": names[0],
                "question": row["Question"],
                "answer": answer,
                "choice_a": row.get("Choice A") or "",
                "choice_b": row.get("Choice B") or "",
                "choice_c": row.get("Choice C") or "",
                "choice_d": row.get("Choice D") or "",
                "answer_label": (row.get("Answer_label") or "").strip(),
            },
        )
