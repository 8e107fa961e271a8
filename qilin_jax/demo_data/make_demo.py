"""Generate the bundled demo task: synthetic medical-style images with Chinese captions and VQA.

    python -m qilin_jax.demo_data.make_demo --out data/demo/generated --seed 0

Writes into the output folder:
  images/*.png             grayscale PNGs (CT-like, X-ray-like, ultrasound-like, MR-like)
  alignment.json           stage 1: LLaVA rows, human "<image>", gpt = Chinese caption
  instruction.json         stage 2: LLaVA rows with Chinese questions, short closed-set answers
  heldout.json             held-out cases (disjoint images), one question each, with "answer"
  pmc_vqa_style.csv        PMC-VQA-format multiple choice over held-out images
  meta.json                counts, seed, answer sets, chance levels

"image" fields are file names relative to images/ (a list of 2-4 names for composite cases).
Everything is a pure function of the seed (byte-identical output). The visual cues are
deliberately strong so a tiny ViT + tiny LLaMA can learn them on a CPU: each modality has its
own global layout and texture, lesions are high-contrast blobs at quadrant centres.

Why one file (over 450 lines): the synthetic images and every question type they answer
are drawn from one seeded generator; split, the byte-identical output would depend on call
order across modules.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from qilin_jax.demo_data import templates as T
from qilin_jax.demo_data.templates import (  # noqa: F401  (re-exported for evaluation code)
    ANSWER_SETS,
    CHANCE,
    QTYPES,
    choice_letter,
    normalize_answer,
)

GENERATOR_VERSION = 5
# Split ids keep the per-sample RNG streams of the splits independent.
_SPLIT_ID = {
    "alignment": 1,
    "instruction": 2,
    "heldout": 3,
    "csv": 4,
    # The backbones' pretraining data (pretrain_backbones.py): streams of their own, so none of
    # its images or texts is a demo sample, held-out ones included.
    "pretrain_vision": 7,
    "pretrain_vision_eval": 8,
    "pretrain_text": 9,
}
# Lesion radius as a fraction of the shorter image side, per size class.
SIZE_RADIUS = {"小": 0.05, "中": 0.08, "大": 0.115}
# Quadrant centres (x, y) as fractions of width/height.
QUADRANT_CENTRE = {"左上": (0.3, 0.3), "右上": (0.7, 0.3), "左下": (0.3, 0.7), "右下": (0.7, 0.7)}
JITTER = 0.04  # lesion centre jitter (fraction of width/height); keeps lesions inside the anatomy
P_COMPOSITE = 0.06  # share of training samples that are composite (2-4 images of one case)
P_NONSQUARE = 0.12  # share of single images that are 5:4 or 4:5
P_MULTI_TURN = 0.2  # share of instruction samples with 2-3 question turns
NOISE = 0.012  # gaussian noise sd; higher costs PNG bytes (noise does not compress)
SPECKLE = 0.6  # ultrasound speckle strength (0: none, 1: full Rayleigh)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y) pixel-centre coordinates as fractions of width/height."""
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    return np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w))


def _ellipse(x, y, cx, cy, rx, ry, soft=0.02) -> np.ndarray:
    """Return a soft-edged ellipse mask in [0, 1]."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def _smooth_noise(rng, h, w, cell) -> np.ndarray:
    """Return low-frequency noise in [-1, 1] (bilinear upsampled coarse grid)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    img = Image.fromarray(((g + 1) * 127.5).astype(np.uint8), "L").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def _render_ct(rng, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, tissue mask) of an axial abdominal CT-like slice."""
    s = rng.uniform(0.95, 1.03)
    cx, cy = 0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02)
    rx, ry = 0.47 * s, 0.42 * s
    body = _ellipse(x, y, cx, cy, rx, ry)
    inner = _ellipse(x, y, cx, cy, rx * 0.9, ry * 0.88)
    img = 0.03 + body * 0.27 + inner * 0.15  # air, subcutaneous fat, soft tissue
    # Dashed bright bone ring (ribs) just inside the fat layer.
    ring = _ellipse(x, y, cx, cy, rx * 0.86, ry * 0.84, 0.03) - _ellipse(x, y, cx, cy, rx * 0.80, ry * 0.77, 0.03)
    ang = np.arctan2(y - cy, x - cx)
    dashes = (np.cos(ang * 14 + rng.uniform(0, 6.3)) > 0.1).astype(np.float32)
    img += np.clip(ring, 0, 1) * dashes * 0.45
    # Organs: liver (image left), kidneys, spine (bright), aorta.
    img += _ellipse(x, y, cx - 0.17, cy - 0.05, 0.16 * s, 0.2 * s, 0.05) * 0.1
    img += _ellipse(x, y, cx - 0.16, cy + 0.17, 0.05, 0.07, 0.1) * 0.12
    img += _ellipse(x, y, cx + 0.16, cy + 0.17, 0.05, 0.07, 0.1) * 0.12
    img += _ellipse(x, y, cx, cy + 0.26 * s, 0.07, 0.06, 0.1) * 0.5
    img += _ellipse(x, y, cx + 0.03, cy + 0.12, 0.03, 0.03, 0.2) * 0.15
    img += inner * _smooth_noise(rng, *x.shape, 8) * 0.04
    img += rng.normal(0, NOISE, x.shape).astype(np.float32)
    return img, inner


def _render_xray(rng, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, lung mask) of a chest X-ray-like projection."""
    s = rng.uniform(0.95, 1.04)
    torso = _ellipse(x, y, 0.5, 0.55, 0.52 * s, 0.6, 0.08)
    img = 0.05 + torso * 0.5
    lungs = np.maximum(
        _ellipse(x, y, 0.27, 0.48, 0.19 * s, 0.36, 0.12), _ellipse(x, y, 0.73, 0.48, 0.19 * s, 0.36, 0.12)
    )
    img -= lungs * 0.35
    # Ribs: bright curved horizontal stripes over the lungs.
    phase = rng.uniform(0, 6.3)
    ribs = np.clip(np.sin((y + 0.12 * (x - 0.5) ** 2 * 4) * 48 + phase) * 2 - 0.8, 0, 1)
    img += ribs * lungs * 0.12
    # Mediastinum/spine (bright vertical band), heart shadow, diaphragm, clavicles.
    img += _ellipse(x, y, 0.5, 0.5, 0.07, 0.5, 0.2) * 0.2
    img += _ellipse(x, y, 0.53, 0.66, 0.1, 0.1, 0.3) * 0.12
    img += np.clip((y - 0.86) * 8, 0, 1) * torso * 0.15
    clav = np.exp(-(((y - 0.12 - 0.25 * (x - 0.5) ** 2) / 0.02) ** 2)) * (np.abs(x - 0.5) > 0.06)
    img += clav * 0.25
    img += _smooth_noise(rng, *x.shape, 10) * 0.03
    img += rng.normal(0, NOISE, x.shape).astype(np.float32)
    return img, lungs


def _render_us(rng, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, sector mask) of an ultrasound-like speckle fan."""
    ax, ay = 0.5, -0.08
    r = np.sqrt((x - ax) ** 2 + (y - ay) ** 2)
    ang = np.arctan2(x - ax, y - ay)
    half = np.deg2rad(rng.uniform(48, 52))
    fan = (
        np.clip((half - np.abs(ang)) / 0.03, 0, 1) * np.clip((r - 0.14) / 0.02, 0, 1) * np.clip((1.04 - r) / 0.02, 0, 1)
    )
    tissue = 0.42 + _smooth_noise(rng, *x.shape, 12) * 0.08 - (r - 0.5) * 0.15  # depth attenuation
    speckle = rng.rayleigh(1.0, x.shape).astype(np.float32) / 1.25
    img = 0.02 + fan * tissue * (1 - SPECKLE + SPECKLE * speckle)
    return img, fan


def _render_mr(rng, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, brain mask) of an axial brain MR-like (T2) slice."""
    s = rng.uniform(0.95, 1.03)
    cx, cy = 0.5, 0.5 + rng.uniform(-0.015, 0.015)
    rx, ry = 0.42 * s, 0.47 * s
    scalp = _ellipse(x, y, cx, cy, rx, ry)
    skull = _ellipse(x, y, cx, cy, rx * 0.93, ry * 0.94)
    brain = _ellipse(x, y, cx, cy, rx * 0.86, ry * 0.88)
    img = 0.02 + scalp * 0.6 - skull * 0.55
    # Grey/white matter: gyral ripple texture.
    rr = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    ang = np.arctan2(y - cy, x - cx)
    gyri = np.sin(ang * rng.integers(9, 13) + rr * 18 + _smooth_noise(rng, *x.shape, 6) * 2.0)
    img += brain * (0.42 + 0.08 * gyri)
    # Ventricles (bright CSF on T2) and the midline.
    img += _ellipse(x, y, cx - 0.06, cy, 0.035, 0.12, 0.3) * brain * 0.35
    img += _ellipse(x, y, cx + 0.06, cy, 0.035, 0.12, 0.3) * brain * 0.35
    img += np.exp(-(((x - cx) / 0.008) ** 2)) * brain * 0.2
    img += rng.normal(0, NOISE, x.shape).astype(np.float32)
    return img, brain


_RENDERERS = {"ct": _render_ct, "xray": _render_xray, "us": _render_us, "mr": _render_mr}


def render_image(case: dict, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return a uint8 [height, width] image of the case (modality background + lesions)."""
    x, y = _grid(height, width)
    img, _ = _RENDERERS[case["modality"]](rng, x, y)
    bright = case["kind"] == "bright"
    short = min(height, width)
    for loc in case["locations"]:
        qx, qy = QUADRANT_CENTRE[loc]
        cx = qx + rng.uniform(-JITTER, JITTER)
        cy = qy + rng.uniform(-JITTER, JITTER)
        r = SIZE_RADIUS[case["size"]] * rng.uniform(0.9, 1.1) * short
        e = rng.uniform(0.8, 1.2)
        mask = _ellipse(x * width, y * height, cx * width, cy * height, r * e, r / e, soft=1.2 / r)
        level = rng.uniform(0.88, 0.98) if bright else rng.uniform(0.03, 0.08)
        tex = rng.normal(0, NOISE, x.shape).astype(np.float32)
        if case["modality"] == "us":  # lesions keep some speckle
            tex = tex + (rng.rayleigh(1.0, x.shape).astype(np.float32) - 1.25) * (0.08 if bright else 0.02)
        img = img * (1 - mask) + (level + tex) * mask
    gain = rng.uniform(0.92, 1.06)
    # 64 grey levels (multiples of 4): the PNGs shrink by ~30% with no visible change.
    return (np.clip(img * gain, 0, 1) * 63 + 0.5).astype(np.uint8) * 4


def _png_bytes(arr: np.ndarray) -> bytes:
    """Return deterministic PNG bytes of a uint8 grayscale array."""
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
def _rng(seed: int, split: str, idx: int) -> np.random.Generator:
    """Return the RNG of one sample: independent of every other sample and of the split sizes."""
    return np.random.default_rng([seed, _SPLIT_ID[split], idx])


def _image_shape(rng: np.random.Generator, image_size: int, n_images: int) -> tuple[int, int]:
    """Return (height, width): square, or 5:4 / 4:5 for some single images."""
    u = rng.uniform()
    if n_images == 1 and u < P_NONSQUARE:
        big = int(round(image_size * 1.25))
        return (image_size, big) if u < P_NONSQUARE / 2 else (big, image_size)
    return image_size, image_size


def _write_images(case: dict, rng, stem: str, image_size: int, img_dir: Path) -> str | list[str]:
    """Render and save the case's image(s); return the "image" field (name or list of names)."""
    k = case["n_images"]
    h, w = _image_shape(rng, image_size, k)
    names = [f"{stem}.png"] if k == 1 else [f"{stem}_{j}.png" for j in range(k)]
    for name in names:
        (img_dir / name).write_bytes(_png_bytes(render_image(case, rng, h, w)))
    return names[0] if k == 1 else names


def _n_images(rng: np.random.Generator, allow_composite: bool) -> int:
    """Return 1, or 2-4 for a composite sample."""
    if allow_composite and rng.uniform() < P_COMPOSITE:
        return int(rng.integers(2, 5))
    return 1


def _case_for_qtype(rng, qtype: str, n_images: int = 1, modality: str | None = None) -> dict:
    """Return a random case on which `qtype` (or choice sub-topic) has an unambiguous answer."""
    if qtype == "kind":
        qtype = "size"  # needs at least one lesion, like size
    if qtype == "location":
        return T.sample_case(rng, modality=modality, count=1, n_images=n_images)
    if qtype == "size":
        return T.sample_case(rng, modality=modality, count=int(rng.integers(1, 4)), n_images=n_images)
    if qtype == "count":
        return T.sample_case(rng, modality=modality, count=int(rng.integers(0, 4)), n_images=n_images)
    return T.sample_case(rng, modality=modality, n_images=n_images)


def _public_case(case: dict) -> dict:
    """Return the case description stored next to each sample (for analysis)."""
    return {
        "modality": case["modality"],
        "count": case["count"],
        "kind": case["kind"],
        "size": case["size"] if case["count"] else None,
        "locations": list(case["locations"]),
        "n_images": case["n_images"],
    }


def make_alignment_sample(seed: int, idx: int, image_size: int, img_dir: Path) -> dict:
    """Return one stage-1 sample (and write its images)."""
    rng = _rng(seed, "alignment", idx)
    case = T.sample_case(rng, n_images=_n_images(rng, True))
    stem = f"align_{idx:05d}"
    image = _write_images(case, rng, stem, image_size, img_dir)
    return {
        "id": stem,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": T.caption(case, rng)}],
        "case": _public_case(case),
    }


def instruction_qtypes(rng: np.random.Generator, n_images: int | None = None) -> tuple[dict, list[str], str | None]:
    """Return (case, question types, choice sub-topic or None) of one instruction sample: a
    uniform first question type, then 1-2 more of the case's types for some samples."""
    qtype = QTYPES[rng.integers(len(QTYPES))]
    # Choice questions: draw the sub-topic first so all five are equally common.
    topic = T.CHOICE_TOPICS[rng.integers(len(T.CHOICE_TOPICS))] if qtype == "choice" else None
    case = _case_for_qtype(rng, topic or qtype, _n_images(rng, True) if n_images is None else n_images)
    qtypes = [qtype]
    if rng.uniform() < P_MULTI_TURN:
        rest = [q for q in T.applicable_qtypes(case) if q != qtype]
        extra = int(rng.integers(1, 3))
        qtypes += [rest[i] for i in rng.permutation(len(rest))[:extra]]
    return case, qtypes, topic


def instruction_turns(case: dict, qtypes: list[str], topic: str | None, rng: np.random.Generator) -> list[dict]:
    """Return the LLaVA turns of an instruction sample: "<image>\\n" + the first question, then
    one gpt reply per question."""
    conv = []
    for t, q in enumerate(qtypes):
        qa = T.question(case, q, rng, topic=topic if t == 0 else None)
        conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + qa["question"]})
        conv.append({"from": "gpt", "value": qa["reply"]})
    return conv


def make_instruction_sample(seed: int, idx: int, image_size: int, img_dir: Path) -> dict:
    """Return one stage-2 sample with 1-3 question turns (and write its images)."""
    rng = _rng(seed, "instruction", idx)
    case, qtypes, topic = instruction_qtypes(rng)
    qtype = qtypes[0]
    stem = f"inst_{idx:05d}"
    image = _write_images(case, rng, stem, image_size, img_dir)
    return {
        "id": stem,
        "image": image,
        "conversations": instruction_turns(case, qtypes, topic, rng),
        "qtype": qtype,
        "qtypes": qtypes,
        "case": _public_case(case),
    }


def make_heldout_sample(seed: int, idx: int, image_size: int, img_dir: Path) -> dict:
    """Return one held-out single-image, single-question sample, balanced by index."""
    rng = _rng(seed, "heldout", idx)
    qtype = QTYPES[idx % len(QTYPES)]
    j = idx // len(QTYPES)
    # Balance the answer of each type across the split (answer = j mod the answer-set size,
    # so chance == majority rate), and the modality of the other types.
    n = len(ANSWER_SETS[qtype])
    modality = T.MODALITY_KEYS[(j if qtype == "modality" else j // n) % 4]
    topic = answer_pos = None
    if qtype == "location":
        case = T.sample_case(rng, modality=modality, count=1, location=T.LOCATIONS[j % 4])
    elif qtype == "count":
        case = T.sample_case(rng, modality=modality, count=j % 4)
    elif qtype == "size":
        case = T.sample_case(rng, modality=modality, count=int(rng.integers(1, 4)), size=T.SIZES[j % 3])
    elif qtype == "choice":
        topic = T.CHOICE_TOPICS[(j // 4) % len(T.CHOICE_TOPICS)]
        answer_pos = j % 4
        case = _case_for_qtype(rng, topic, modality=modality)
    else:
        case = T.sample_case(rng, modality=modality)
    qa = T.question(case, qtype, rng, topic=topic, answer_pos=answer_pos)
    stem = f"heldout_{idx:05d}"
    image = _write_images(case, rng, stem, image_size, img_dir)
    sample = {
        "id": stem,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + qa["question"]},
            {"from": "gpt", "value": qa["reply"]},
        ],
        "qtype": qtype,
        "answer": qa["answer"],
        "case": _public_case(case),
    }
    if qtype == "choice":
        sample.update(choices=qa["choices"], topic=qa["topic"], answer_text=qa["answer_text"])
    return sample


def make_csv_row(seed: int, idx: int, heldout: dict) -> dict:
    """Return one PMC-VQA-format row: a multiple-choice question on a held-out image."""
    rng = _rng(seed, "csv", idx)
    case = {**heldout["case"], "size": heldout["case"]["size"] or "中"}
    qa = T.question(case, "choice", rng)
    row = {"Figure_path": heldout["image"], "Question": qa["stem"], "Answer": qa["answer_text"]}
    for c in qa["choices"]:
        row[f"Choice {c[0]}"] = c
    row["Answer_label"] = qa["answer"]
    return row


CSV_COLUMNS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def _dump_json(obj, path: Path) -> None:
    """Write JSON deterministically (UTF-8, Chinese unescaped; a list gets one sample per line)."""
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in obj) + "\n]\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_align: int = 2000,
    n_instruct: int = 3000,
    n_heldout: int = 300,
    image_size: int = 64,
    n_csv: int = 100,
) -> dict:
    """Generate the demo task into out_dir; return the meta dict (also written as meta.json)."""
    if n_heldout and n_heldout < len(QTYPES):
        raise ValueError(f"n_heldout={n_heldout}: need at least {len(QTYPES)} (one per question type)")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: use >= 32 so small lesions stay visible")
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):  # a re-run with smaller sizes must not leave stale files
        old.unlink()
    t0 = time.perf_counter()
    alignment = [make_alignment_sample(seed, i, image_size, img_dir) for i in range(n_align)]
    instruction = [make_instruction_sample(seed, i, image_size, img_dir) for i in range(n_instruct)]
    heldout = [make_heldout_sample(seed, i, image_size, img_dir) for i in range(n_heldout)]
    single = [h for h in heldout if isinstance(h["image"], str)]
    rows = [make_csv_row(seed, i, single[i]) for i in range(min(n_csv, len(single)))]
    _dump_json(alignment, out / "alignment.json")
    _dump_json(instruction, out / "instruction.json")
    _dump_json(heldout, out / "heldout.json")
    with open(out / "pmc_vqa_style.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    per_type = {q: sum(h["qtype"] == q for h in heldout) for q in QTYPES}
    majority = {}
    for q in QTYPES:
        answers = [h["answer"] for h in heldout if h["qtype"] == q]
        majority[q] = max(answers.count(a) for a in set(answers)) / len(answers) if answers else None
    n_files = sum(1 for _ in img_dir.glob("*.png"))
    total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "meta.json")
    meta = {
        "generator": "qilin_jax.demo_data.make_demo",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "image_dir": "images",
        "files": {
            "alignment": "alignment.json",
            "instruction": "instruction.json",
            "heldout": "heldout.json",
            "pmc_vqa_style": "pmc_vqa_style.csv",
        },
        "counts": {
            "alignment": len(alignment),
            "instruction": len(instruction),
            "heldout": len(heldout),
            "pmc_vqa_style": len(rows),
            "images": n_files,
            "composite_alignment": sum(isinstance(s["image"], list) for s in alignment),
            "composite_instruction": sum(isinstance(s["image"], list) for s in instruction),
            "multi_turn_instruction": sum(len(s["conversations"]) > 2 for s in instruction),
            "instruction_by_qtype": {q: sum(s["qtype"] == q for s in instruction) for q in QTYPES},
            "heldout_by_qtype": per_type,
        },
        "qtypes": list(QTYPES),
        "answer_sets": ANSWER_SETS,
        "chance": CHANCE,
        "heldout_majority": majority,
        "modalities": {k: T.MODALITY_ANSWER[k] for k in T.MODALITY_KEYS},
        "notes": [
            "Locations are image quadrants as displayed (not patient left/right).",
            "Held-out samples are single-image and single-question; their images are never used in training.",
            "Questions are raw (no Appendix A.1 instruction suffix); the pipeline may add one.",
        ],
        "total_bytes": total_bytes,
    }
    _dump_json(meta, out / "meta.json")
    meta["_seconds"] = time.perf_counter() - t0  # not written: keeps meta.json byte-identical
    return meta


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="Generate the bundled demo task (synthetic medical VQA).")
    ap.add_argument("--out", type=Path, default=Path("data/demo/generated"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-align", type=int, default=2000)
    ap.add_argument("--n-instruct", type=int, default=3000)
    ap.add_argument("--n-heldout", type=int, default=300)
    ap.add_argument("--n-csv", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args(argv)
    meta = generate(
        a.out,
        seed=a.seed,
        n_align=a.n_align,
        n_instruct=a.n_instruct,
        n_heldout=a.n_heldout,
        image_size=a.image_size,
        n_csv=a.n_csv,
    )
    c = meta["counts"]
    print(
        f"wrote {a.out}: {c['alignment']} alignment, {c['instruction']} instruction, "
        f"{c['heldout']} held-out, "
        f"{c['pmc_vqa_style']} csv rows, {c['images']} images, {meta['total_bytes'] / 1e6:.1f} MB "
        f"in {meta['_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
