"""Random-access sources: LLaVA JSON/JSONL (ChiMed-VL), PMC-VQA CSV and TFDS array_record.

A source returns raw rows; `row_to_sample` checks the fields and turns a row into
(sample_id, image refs, image names, conversations). The check runs per sample inside the
loader, so a row that does not fit is skipped and counted (or, in strict mode, raises an
error naming the file, the row and the field), never guessed at.

Files are read as bytes and decoded as UTF-8 with `surrogateescape`: an undecodable byte
does not fail the file, it marks the rows that contain it, which are then rejected with
reason "not_utf8".
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qilin_jax.data.conversation import IMAGE_TAG
from qilin_jax.data.errors import DataError
from qilin_jax.data.prompts import MC_SUFFIX

PMC_REQUIRED = ("Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D")
PMC_ANSWER = ("Answer", "Anwser")  # the released CSVs spell it both ways
PMC_STYLES = ("choice", "open")
SOURCE_FORMATS = ("llava_json", "pmc_vqa_csv", "tfds")


def _read_text(path: str) -> str:
    """Returns the file's text; undecodable bytes become lone surrogates (flagged later)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path} (check data.paths)") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class _PackedRows:
    """Rows stored as one JSON-bytes blob + offsets: cheap to pickle into worker processes."""

    def __init__(self, rows: Sequence[Any], origins: Sequence[str]):
        enc = [json.dumps(r, ensure_ascii=True).encode("ascii") for r in rows]
        self._blob = b"".join(enc)
        self._offsets = np.cumsum([0] + [len(e) for e in enc]).astype(np.int64)
        self._origins = list(origins)

    def __len__(self) -> int:
        return len(self._origins)

    def __getitem__(self, i: int) -> dict:
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return json.loads(self._blob[a:b])

    def origin(self, i: int) -> str:
        return self._origins[i]


class LlavaJsonSource:
    """LLaVA-style rows from .json (a list) and .jsonl files; `image_folder` resolves names."""

    kind = "llava"

    def __init__(self, paths: Sequence[str], image_folder: str = ""):
        self.image_folder = image_folder
        rows: list[Any] = []
        origins: list[str] = []
        for path in paths:
            text = _read_text(path)
            name = os.path.basename(path)
            stripped = text.lstrip()
            if path.endswith(".jsonl") or (stripped and stripped[0] == "{"):
                for ln, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    origins.append(f"{name}:{ln}")
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        rows.append({"__error__": "bad_json", "__detail__": str(e)})
            else:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}: not valid JSON ({e}); expected a list of LLaVA records "
                        "or one record per line (.jsonl)"
                    ) from None
                if not isinstance(data, list):
                    raise ValueError(
                        f"{path}: the top level is a {type(data).__name__}; expected a list of "
                        "records [{'id', 'image', 'conversations'}, ...]"
                    )
                rows.extend(data)
                origins.extend(f"{name}[{i}]" for i in range(len(data)))
        self._rows = _PackedRows(rows, origins)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return {"kind": self.kind, "row": self._rows[i], "origin": self._rows.origin(i)}


class PmcVqaCsvSource:
    """PMC-VQA rows from CSV files (Figure_path, Question, Answer|Anwser, Choice A..D, Answer_label)."""

    kind = "pmc_vqa"

    def __init__(self, paths: Sequence[str], image_folder: str = ""):
        self.image_folder = image_folder
        rows: list[dict] = []
        origins: list[str] = []
        for path in paths:
            reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in PMC_REQUIRED if c not in header]
            if not any(a in header for a in PMC_ANSWER):
                missing.append("Answer (or Anwser)")
            if missing:
                raise ValueError(f"{path}: PMC-VQA CSV is missing column(s) {missing}; found {header}")
            name = os.path.basename(path)
            for ln, row in enumerate(reader, 2):
                rows.append({(k or "").strip(): v for k, v in row.items()})
                origins.append(f"{name}:{ln}")
        self._rows = _PackedRows(rows, origins)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return {"kind": self.kind, "row": self._rows[i], "origin": self._rows.origin(i)}


class TfdsSource:
    """Rows of a dataset built by data/chimed_vl or data/pmc_vqa, read without TensorFlow."""

    def __init__(self, path: str, split: str = "train"):
        import tensorflow_datasets as tfds

        self.path = path
        self.split = split
        builder = tfds.builder_from_directory(path)
        self.kind = "pmc_vqa" if "question" in builder.info.features else "llava"
        self._ds = builder.as_data_source(split=split)
        self.image_folder = ""

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        ex = self._ds[i]
        origin = f"{os.path.basename(self.path.rstrip('/'))}/{self.split}[{i}]"
        dec = lambda b: b.decode("utf-8", errors="surrogateescape") if isinstance(b, bytes) else b
        if self.kind == "pmc_vqa":
            row = {
                "Figure_path": dec(ex["image_name"]),
                "Question": dec(ex["question"]),
                "Answer": dec(ex["answer"]),
                "Choice A": dec(ex["choice_a"]),
                "Choice B": dec(ex["choice_b"]),
                "Choice C": dec(ex["choice_c"]),
                "Choice D": dec(ex["choice_d"]),
                "Answer_label": dec(ex["answer_label"]),
                "__image_bytes__": [ex["image"]],
            }
        else:
            try:
                conversations = json.loads(dec(ex["conversations"]))
            except json.JSONDecodeError as e:
                conversations = {"__error__": str(e)}
            row = {
                "id": dec(ex["id"]),
                "image": [dec(n) for n in ex["image_names"]],
                "conversations": conversations,
                "__image_bytes__": list(ex["images"]),
            }
        return {"kind": self.kind, "row": row, "origin": origin}


def open_source(fmt: str, paths: Sequence[str], image_folder: str = "", split: str = "train"):
    """Returns the random-access source for data.format (llava_json | pmc_vqa_csv | tfds)."""
    if not paths:
        raise ValueError("data.paths is empty: give the JSON/JSONL/CSV files or TFDS directories")
    if fmt == "llava_json":
        return LlavaJsonSource(paths, image_folder)
    if fmt == "pmc_vqa_csv":
        return PmcVqaCsvSource(paths, image_folder)
    if fmt == "tfds":
        sources = [TfdsSource(p, split) for p in paths]
        return sources[0] if len(sources) == 1 else ConcatSource(sources)
    raise ValueError(f"data.format must be one of {SOURCE_FORMATS}, got {fmt!r}")


class ConcatSource:
    """Several random-access sources as one."""

    def __init__(self, sources: Sequence[Any]):
        self._sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self._sources])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> dict:
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return self._sources[k][i - start]


# --------------------------------------------------------------------------------------------
# Row -> sample


def _choice_line(letter: str, value: Any) -> str:
    v = ("" if value is None else str(value)).strip()
    for sep in (":", "：", ".", ")"):
        if v.upper().startswith(letter + sep):
            return v
    return f"{letter}: {v}"


def pmc_vqa_conversation(row: dict, style: str = "choice", language: str = "en") -> list[dict]:
    """Returns the LLaVA conversation for a PMC-VQA row: multiple choice (letter) or open answer."""
    if style not in PMC_STYLES:
        raise ValueError(f"pmc_vqa_style must be one of {PMC_STYLES}, got {style!r}")
    question = row.get("Question")
    if not isinstance(question, str) or not question.strip():
        raise DataError("bad_record", "empty or missing 'Question'")
    answer = row.get("Answer", row.get("Anwser"))
    if answer is None:
        answer = row.get("Anwser")
    if style == "choice":
        label = (row.get("Answer_label") or "").strip().upper()[:1]
        if label not in ("A", "B", "C", "D"):
            raise DataError("bad_record", f"'Answer_label' must be A, B, C or D, got {row.get('Answer_label')!r}")
        lines = [_choice_line(x, row.get(f"Choice {x}")) for x in "ABCD"]
        human = f"{IMAGE_TAG}\n{question.strip()}\n" + "\n".join(lines) + "\n" + MC_SUFFIX[language]
        return [{"from": "human", "value": human}, {"from": "gpt", "value": label}]
    if not isinstance(answer, str) or not answer.strip():
        raise DataError("bad_record", "empty or missing 'Answer'/'Anwser'")
    return [
        {"from": "human", "value": f"{IMAGE_TAG}\n{question.strip()}"},
        {"from": "gpt", "value": answer.strip()},
    ]


def row_to_sample(
    item: dict, image_folder: str = "", *, pmc_style: str = "choice", pmc_language: str = "en"
) -> tuple[str, list, list[str], Any]:
    """Returns (sample_id, image refs (paths or bytes), image names, conversations) or raises."""
    row = item["row"]
    if isinstance(row, dict) and "__error__" in row:
        raise DataError(row["__error__"], row.get("__detail__", "unreadable row"))
    if not isinstance(row, dict):
        raise DataError("bad_record", f"a record must be a JSON object, got {type(row).__name__}")
    if item["kind"] == "pmc_vqa":
        name = row.get("Figure_path")
        if not isinstance(name, str) or not name.strip():
            raise DataError("bad_record", "empty or missing 'Figure_path'")
        names = [name.strip()]
        sample_id = names[0]
        conversations = pmc_vqa_conversation(row, pmc_style, pmc_language)
    else:
        if "conversations" not in row:
            raise DataError("bad_record", f"no 'conversations' field (fields found: {sorted(row)})")
        conversations = row["conversations"]
        if isinstance(conversations, dict) and "__error__" in conversations:
            raise DataError("bad_record", f"'conversations' is not valid JSON: {conversations['__error__']}")
        sample_id = str(row.get("id", ""))
        image = row.get("image")
        if image is None or image == "":
            names = []
        elif isinstance(image, str):
            names = [image]
        elif isinstance(image, list) and all(isinstance(x, str) and x for x in image):
            names = list(image)
        else:
            raise DataError("bad_record", f"'image' must be a file name or a list of names, got {image!r:.80}")
    for n in names:
        if _has_surrogates(n):
            raise DataError("not_utf8", f"image name {n!r} is not valid UTF-8")
    if _has_surrogates(sample_id):
        raise DataError("not_utf8", "the sample id is not valid UTF-8")
    if "__image_bytes__" in row:
        refs = list(row["__image_bytes__"])
    else:
        refs = [n if os.path.isabs(n) else os.path.join(image_folder, n) for n in names]
    return sample_id, refs, names, conversations
