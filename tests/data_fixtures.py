"""Shared helpers for the data tests: a tiny LLaMA-like tokenizer, images and sample files.

The `tokenizer` fixture (tests/conftest.py) is `load_tokenizer()`: the project's demo
tokenizer (qilin_jax/demo_data/tokenizer) when it exists, else a SentencePiece BPE model trained
here with LLaMA's settings (byte fallback,
split digits, identity normalisation, unk=0 bos=1 eos=2, no pad), wrapped as a transformers
LlamaTokenizer with legacy=True (the release's behaviour).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CORPUS = """A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in the image? ASSISTANT: A chest X-ray with a nodule in the left lung.
USER: Where is the lesion? ASSISTANT: The lesion is in the liver.
[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> What is this? [/INST]
胸部X光片显示左肺有一个结节。这是一张腹部CT扫描图像，肝脏可见低密度病灶。
请基于图中的信息，撰写一段相关的描述。根据图示内容，写一段相关的文本。
图中显示了什么？病变位于哪里？肿瘤位于肝脏。请尽量简洁地回答。请直接作答。
The patient presented with fever and cough. MRI of the brain shows a lesion of 12 mm.
患者出现发热和咳嗽。脑部磁共振成像显示病变。超声图像显示胎儿。心脏彩超未见异常。
Answer with the option's letter from the given choices directly. A: liver B: lung C: heart D: brain
"""

_CACHE: dict[str, object] = {}


def train_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 700) -> str:
    """Trains the tiny SentencePiece model into out_dir as an HF tokenizer dir; returns the dir."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
                "model_max_length": 2048,
            }
        )
    )
    corpus.unlink()
    return str(out)


def tokenizer_dir() -> str:
    """Returns a tokenizer directory: qilin_jax/demo_data/tokenizer if present, else a freshly trained one."""
    if "dir" not in _CACHE:
        shipped = REPO / "qilin_jax" / "demo_data" / "tokenizer"
        if (shipped / "tokenizer_config.json").exists() and os.environ.get("QILIN_TEST_OWN_TOKENIZER", "") != "1":
            _CACHE["dir"] = str(shipped)
        else:
            _CACHE["dir"] = train_tiny_tokenizer(tempfile.mkdtemp(prefix="qilin_tok_"))
    return _CACHE["dir"]  # type: ignore[return-value]


def load_tokenizer():
    """Returns the test tokenizer (cached)."""
    if "tok" not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE["tok"] = AutoTokenizer.from_pretrained(tokenizer_dir())
    return _CACHE["tok"]


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Returns a smooth random image (compresses like a photo) of size w x h."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-8, 9, (h, w, 3))
    arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def save_image(path: str | os.PathLike, w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> str:
    """Writes a random image file and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(w, h, seed).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return str(path)


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    """Returns a random JPEG's bytes."""
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def conv(q: str, a: str, *more: str) -> list[dict]:
    """Returns a LLaVA conversation from alternating human/gpt strings."""
    texts = (q, a) + more
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def make_llava_dataset(root: str | os.PathLike, n: int = 12, size: int = 64) -> tuple[str, str]:
    """Writes n good LLaVA-style samples (JSON + images); returns (json_path, image_folder).

    Sample i has id f"s{i}", image PMC{i:04d}_Fig1_{i}.jpg (random, seed i) and an answer that
    starts with f"编号{i}：", so tests can tell samples apart from the decoded labels.
    """
    root = Path(root)
    img_dir = root / "images"
    rows = []
    for i in range(n):
        name = f"PMC{i:04d}_Fig1_{i}.jpg"
        save_image(img_dir / name, size + 7 * (i % 5), size + 3 * (i % 3), seed=i)
        rows.append(
            {
                "id": f"s{i}",
                "image": name,
                "conversations": conv(
                    "<image>\n图中显示了什么？" + "病变" * (i % 4),
                    f"编号{i}：" + "胸部X光片显示左肺有一个结节。" * (1 + i % 3),
                ),
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path), str(img_dir)


def answers_in_batch(batch: dict, tok) -> list[list[str]]:
    """Returns, per row, the decoded supervised text of each packed segment (</s> removed)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        row = []
        seg = batch["segment_ids"][r]
        for k in range(1, int(seg.max()) + 1):
            lab = batch["labels"][r][(seg == k) & (batch["labels"][r] != -100)]
            row.append(tok.decode(lab.tolist()).replace("</s>", "").strip())
        out.append(row)
    return out


def sample_number(answer: str) -> int:
    """Returns i from an answer that starts with 编号{i}："""
    import re

    m = re.match(r"编号(\d+)：", answer)
    assert m, answer
    return int(m.group(1))
