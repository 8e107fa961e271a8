"""Data pipeline benchmark: samples/s per CPU core for the full path, and padding waste.

    python bench/data.py [--samples 192] [--tokenizer qilin_jax/demo_data/tokenizer] [--workers 0]

1. Throughput: writes `--samples` ChiMed-VL-like samples (JPEGs of 336x336 up to 1600x1200,
   ~10% with 2-3 images to composite, Chinese Q/A with ChiMed-VL-Instruction lengths) to a
   temp dir, then runs the real loader in ONE process and thread (worker_count=0,
   read_threads=0): read row, decode, composite, pad + bicubic resize to 336, normalise,
   tokenize with labels, batch. samples/s of that single thread = samples/s per core (with
   --workers N the rate is divided by N). Also times each sample alone by image size.
2. Padding: pushes 20,000 sample lengths drawn like ChiMed-VL (Table 2 for instruction
   tuning: Q median 20 (16, 25), A median 22 (12, 34) tokens; Table 1 for alignment: caption
   median 75 (47, 132)) through the loader's own row/batch code, without and with packing,
   at the default config (batch 16, buckets up to 2688, 576 image tokens; packed rows of
   pack_length 4096 with 6 image slots).

Prints one JSON line (samples_per_s_per_core, padding_fraction, padding_fraction_packed, ...)
then a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grain  # noqa: E402
from PIL import Image  # noqa: E402

from qilin_jax.data.config import DataConfig  # noqa: E402
from qilin_jax.data.grain_ops import Batches, FilterSkips, Rows  # noqa: E402
from qilin_jax.data.packing import Collate  # noqa: E402
from qilin_jax.data.pipeline import make_loader  # noqa: E402
from qilin_jax.data.processor import SampleProcessor  # noqa: E402
from qilin_jax.data.prompts import ALIGNMENT_PROMPTS_ZH, INSTRUCTION_PROMPTS_ZH  # noqa: E402

POOL = (
    "患者男性，六十五岁，因咳嗽咳痰两周入院。胸部X光片显示左肺下叶可见一个约十二毫米的结节，边界清楚。"
    "腹部CT扫描图像显示肝脏右叶低密度病灶，增强扫描呈环形强化，考虑转移瘤可能。"
    "脑部磁共振成像显示左侧额叶异常信号，T2加权像呈高信号，周围可见水肿带。"
    "超声图像显示胎儿发育正常，胎心搏动规律，羊水量适中。心脏彩超未见明显异常。"
    "病理切片显示肿瘤细胞呈巢状排列，核分裂象易见，免疫组化提示上皮来源。"
    "The chest radiograph shows a nodule in the left lower lobe with clear margins. "
    "Axial CT of the abdomen demonstrates a hypodense lesion in the right hepatic lobe. "
) + "".join(ALIGNMENT_PROMPTS_ZH + INSTRUCTION_PROMPTS_ZH).replace("<image>", "").replace("<question>", "")

SIZES = [(336, 336), (336, 336), (640, 480), (800, 600), (1024, 768), (1600, 1200)]


def lognormal(rng, median, q1, q3, n, hi):
    """Returns n integer lengths: lognormal with the given median and quartiles, clipped."""
    sigma = np.log(q3 / q1) / (2 * 0.6745)
    return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), 1, hi).astype(int)


class TextMaker:
    """Makes text of about n tokens by decoding windows of a tokenized Chinese/English pool."""

    def __init__(self, tok):
        self.tok = tok
        self.ids = tok(POOL * 20, add_special_tokens=False, verbose=False)["input_ids"]

    def __call__(self, rng, n):
        start = int(rng.integers(0, len(self.ids) - n - 1))
        return self.tok.decode(self.ids[start : start + n]).replace("<image>", "")


def make_dataset(root: Path, n: int, tok, seed: int = 0):
    """Writes n samples (images + instruction.json); returns (json path, image dir, size classes)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    text = TextMaker(tok)
    q = lognormal(rng, 20, 16, 25, n, 4040)
    a = lognormal(rng, 22, 12, 34, n, 732)
    rows, classes = [], []
    for i in range(n):
        n_img = 1 if rng.random() > 0.1 else int(rng.integers(2, 4))
        w, h = SIZES[i % len(SIZES)]
        names = []
        for k in range(n_img):
            # Smooth random content + noise: compresses like a medical figure, not like noise.
            small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            arr = np.clip(np.asarray(img, np.int16) + rng.integers(-6, 7, (h, w, 3)), 0, 255)
            name = f"PMC{i:06d}_Fig{k + 1}_{i}.jpg"
            Image.fromarray(arr.astype(np.uint8)).save(img_dir / name, "JPEG", quality=90)
            names.append(name)
        rows.append(
            {
                "id": f"bench{i}",
                "image": names if n_img > 1 else names[0],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + text(rng, int(q[i]))},
                    {"from": "gpt", "value": text(rng, int(a[i]))},
                ],
            }
        )
        classes.append("336" if (w, h) == (336, 336) and n_img == 1 else "large")
    path = root / "instruction.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path), str(img_dir), classes


def throughput(path, img_dir, tok, workers: int, epochs: int = 2):
    """Returns (samples/s per core, seconds, samples) for the full loader path."""
    cfg = DataConfig(
        paths=[path],
        image_folder=img_dir,
        template="v1",
        image_mode="pad",
        batch_size=8,
        num_epochs=epochs,
        worker_count=workers,
        read_threads=0,
        prefetch_buffer=0,
        drop_remainder=False,
    )
    loader = make_loader(cfg, tok, process_index=0, process_count=1)
    next(loader)  # warm-up: first batch (worker start-up, caches) not timed
    done0 = loader.stats()["samples"]
    t0 = time.perf_counter()
    for _ in loader:
        pass
    dt = time.perf_counter() - t0
    done = loader.stats()["samples"] - done0
    loader.close()
    return done / dt / max(1, workers), dt, done


def per_sample_ms(path, img_dir, tok, classes, draft=None):
    """Returns mean ms per sample for SampleProcessor alone, by image size class."""
    cfg = DataConfig(paths=[path], image_folder=img_dir, template="v1", image_mode="pad", jpeg_draft_size=draft)
    from qilin_jax.data.sources import open_source

    src = open_source("llava_json", [path], img_dir)
    proc = SampleProcessor(cfg, tok, src, len(src))
    times: dict[str, list[float]] = {}
    for i in range(len(src)):
        t = time.perf_counter()
        proc.process(i)
        times.setdefault(classes[i], []).append(time.perf_counter() - t)
    return {k: 1000 * float(np.mean(v)) for k, v in times.items()}


def padding(lengths, cfg: DataConfig) -> float:
    """Returns the loader's padding fraction for these sample lengths (1 image each)."""
    elements = [
        {
            "input_ids": np.zeros(int(n), np.int32),
            "labels": np.zeros(int(n), np.int32),
            "pixel_values": np.zeros((1, 3, 1, 1), np.float32),
            "epoch": 0,
        }
        for n in lengths
    ]
    slots = cfg.image_slots()
    it = grain.MapDataset.source(elements).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows = Rows(FilterSkips(it), cfg.packing, cfg.row_length(), slots, cfg.pack_buffer)
    collate = Collate(cfg.batch_size, cfg.seq_buckets, slots, 1, fixed_length=cfg.pack_length if cfg.packing else None)
    batches = Batches(rows, collate, cfg.batch_size, True)
    for _ in batches:
        pass
    s = batches.last_iterator.stats
    return 1.0 - s["tokens"] / s["slots"]


def main(argv=None):
    """Runs the benchmark and prints the JSON line and the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--tokenizer", default=str(REPO / "qilin_jax" / "demo_data" / "tokenizer"))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--lengths", type=int, default=20000, help="samples in the padding simulation")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    with tempfile.TemporaryDirectory(prefix="qilin_bench_") as tmp:
        t = time.perf_counter()
        path, img_dir, classes = make_dataset(Path(tmp), a.samples, tok)
        gen_s = time.perf_counter() - t
        rate, secs, done = throughput(path, img_dir, tok, a.workers)
        ms = per_sample_ms(path, img_dir, tok, classes)

    # Padding on ChiMed-VL-shaped lengths, with this tokenizer's real template overhead.
    from qilin_jax.data.conversation import tokenize_conversation

    c = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": ""}]
    overhead_v1 = len(tokenize_conversation(c, tok, "v1", 576)[0]) - 576 - 1  # minus the "▁" answer
    rng = np.random.default_rng(1)
    n = a.lengths
    stage2 = overhead_v1 + 576 + lognormal(rng, 20, 16, 25, n, 4040) + lognormal(rng, 22, 12, 34, n, 732)
    stage1 = 2 + 576 + lognormal(rng, 75, 47, 132, n, 1551)  # BOS, image, caption, "\n"
    cap = 2048 + 575  # release: 2048 text tokens with the image counted once
    stage2, stage1 = np.minimum(stage2, cap), np.minimum(stage1, cap)
    base = DataConfig()
    packed = DataConfig(packing=True)
    result = {
        "samples_per_s_per_core": round(rate, 1),
        "padding_fraction": round(padding(stage2, base), 4),
        "padding_fraction_packed": round(padding(stage2, packed), 4),
        "padding_fraction_stage1": round(padding(stage1, base), 4),
        "padding_fraction_packed_stage1": round(padding(stage1, packed), 4),
        "ms_per_sample_336": round(ms.get("336", float("nan")), 2),
        "ms_per_sample_large": round(ms.get("large", float("nan")), 2),
        "samples_per_s_per_core_336": round(1000 / ms["336"], 1) if "336" in ms else None,
        "samples_per_s_per_core_large": round(1000 / ms["large"], 1) if "large" in ms else None,
        "samples_timed": done,
        "seconds": round(secs, 2),
        "workers": a.workers,
        "image_sizes": sorted({f"{w}x{h}" for w, h in SIZES}),
        "batch_size_padding": base.batch_size,
        "seq_buckets": base.seq_buckets,
        "pack_length": packed.row_length(),
        "image_slots_packed": packed.image_slots(),
        "generate_s": round(gen_s, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    ok = result["samples_per_s_per_core"] >= 50 and result["padding_fraction_packed"] < 0.10
    print(
        f"data bench: {result['samples_per_s_per_core']} samples/s/core full path "
        f"(336px {result['samples_per_s_per_core_336']}, large {result['samples_per_s_per_core_large']}); "
        f"padding {result['padding_fraction']:.1%} -> {result['padding_fraction_packed']:.1%} packed "
        f"(stage 1: {result['padding_fraction_stage1']:.1%} -> {result['padding_fraction_packed_stage1']:.1%}); "
        f"targets >=50/s/core, <10% packed: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
