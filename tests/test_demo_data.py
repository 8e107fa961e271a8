"""Tests of the bundled demo task generator and the demo tokenizer (qilin_jax/demo_data)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qilin_jax.demo_data import make_demo, templates
from qilin_jax.demo_data.make_demo import ANSWER_SETS, CHANCE, QTYPES, generate, normalize_answer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "qilin_jax" / "demo_data" / "tokenizer"
SMALL = dict(n_align=30, n_instruct=60, n_heldout=25, image_size=64, n_csv=10)
OPTION_RE = re.compile(r"^([ABCD]):(.+)$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_a")
    generate(out, seed=0, **SMALL)
    return out


def _load(out: Path, name: str):
    return json.loads((out / name).read_text(encoding="utf-8"))


def _images(sample: dict) -> list[str]:
    return sample["image"] if isinstance(sample["image"], list) else [sample["image"]]


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- data
def test_deterministic_byte_identical(demo, tmp_path):
    generate(tmp_path / "b", seed=0, **SMALL)
    a, b = _tree(demo), _tree(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    generate(tmp_path / "c", seed=1, **SMALL)
    c = _tree(tmp_path / "c")
    assert a["alignment.json"] != c["alignment.json"]
    assert a["images/align_00000.png"] != c["images/align_00000.png"]


def test_samples_independent_of_split_sizes(demo, tmp_path):
    generate(tmp_path / "d", seed=0, n_align=5, n_instruct=5, n_heldout=5, n_csv=2)
    small = _load(tmp_path / "d", "instruction.json")
    assert small == _load(demo, "instruction.json")[:5]


def test_files_and_meta(demo):
    meta = _load(demo, "meta.json")
    for name in ("alignment.json", "instruction.json", "heldout.json", "pmc_vqa_style.csv"):
        assert (demo / name).is_file()
    c = meta["counts"]
    assert (c["alignment"], c["instruction"], c["heldout"]) == (30, 60, 25)
    assert c["images"] == len(list((demo / "images").glob("*.png")))
    assert meta["seed"] == 0 and meta["qtypes"] == list(QTYPES)
    assert meta["answer_sets"] == ANSWER_SETS and meta["chance"] == CHANCE
    assert set(meta["chance"]) == set(QTYPES)


def _check_conversation(sample: dict, split: str) -> None:
    conv = sample["conversations"]
    assert len(conv) >= 2 and len(conv) % 2 == 0, sample["id"]
    for i, turn in enumerate(conv):
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt"), sample["id"]
        assert isinstance(turn["value"], str) and turn["value"].strip(), sample["id"]
    assert sum(t["value"].count("<image>") for t in conv) == 1, sample["id"]
    first = conv[0]["value"]
    if split == "alignment":
        assert first == "<image>"
    else:
        assert first.startswith("<image>\n") and len(first) > len("<image>\n")


def _check_answer(question: str, answer: str, qtype: str, sid: str) -> None:
    if qtype != "choice":
        assert answer in ANSWER_SETS[qtype], (sid, qtype, answer)
        return
    # A choice reply is the chosen option's text (PMC-VQA's Answer column), exactly one option's.
    options = {m.group(1): line[2:] for line in question.split("\n") if (m := OPTION_RE.match(line))}
    assert list(options) == ["A", "B", "C", "D"], sid
    assert list(options.values()).count(answer) == 1, (sid, answer, options)


def test_format_valid(demo):
    names = {p.name for p in (demo / "images").glob("*.png")}
    for split in ("alignment", "instruction", "heldout"):
        data = _load(demo, f"{split}.json")
        assert len({s["id"] for s in data}) == len(data)
        for s in data:
            _check_conversation(s, split)
            imgs = _images(s)
            assert 1 <= len(imgs) <= 4 and not (isinstance(s["image"], list) and len(imgs) < 2), s["id"]
            assert set(imgs) <= names, s["id"]
            if split == "alignment":
                assert len(s["conversations"]) == 2
                continue
            qtypes = s["qtypes"] if split == "instruction" else [s["qtype"]]
            assert s["qtype"] == qtypes[0] and len(qtypes) == len(s["conversations"]) // 2
            for t, qt in enumerate(qtypes):
                assert qt in QTYPES
                _check_answer(s["conversations"][2 * t]["value"], s["conversations"][2 * t + 1]["value"], qt, s["id"])
            if split == "heldout":
                assert len(s["conversations"]) == 2
                if s["qtype"] != "choice":
                    assert s["answer"] == s["conversations"][1]["value"]
                else:  # the gold letter beside the reply, the option's text
                    assert s["answer"] in ANSWER_SETS["choice"]
                    assert s["conversations"][1]["value"] == s["answer_text"]
                    assert [c[:2] for c in s["choices"]] == ["A:", "B:", "C:", "D:"]
                    correct = s["choices"]["ABCD".index(s["answer"])]
                    assert correct == f"{s['answer']}:{s['answer_text']}"
                    assert "\n".join(s["choices"]) in s["conversations"][0]["value"]


def test_images_are_valid(demo):
    sizes = set()
    for p in sorted((demo / "images").glob("*.png"))[:60]:
        with Image.open(p) as im:
            im.load()
            assert im.mode == "L" and im.format == "PNG"
            sizes.add(im.size)
            arr = np.asarray(im)
            assert arr.std() > 10  # not blank
    assert (64, 64) in sizes


def test_variety(tmp_path):
    out = tmp_path / "v"
    generate(out, seed=3, n_align=200, n_instruct=200, n_heldout=5, n_csv=0)
    al, ins = _load(out, "alignment.json"), _load(out, "instruction.json")
    cases = [s["case"] for s in al + ins]
    assert {c["modality"] for c in cases} == set(templates.MODALITY_KEYS)
    assert {c["count"] for c in cases} == {0, 1, 2, 3}
    assert {c["size"] for c in cases if c["count"]} == set(templates.SIZES)
    assert {loc for c in cases for loc in c["locations"]} == set(templates.LOCATIONS)
    assert any(isinstance(s["image"], list) for s in al) and any(isinstance(s["image"], list) for s in ins)
    assert any(len(s["conversations"]) > 2 for s in ins)
    assert {s["qtype"] for s in ins} == set(QTYPES)
    shapes = {Image.open(out / "images" / _images(s)[0]).size for s in al}
    assert len(shapes) >= 2  # some non-square images


def test_heldout_disjoint_and_balanced(demo):
    train = {n for split in ("alignment", "instruction") for s in _load(demo, f"{split}.json") for n in _images(s)}
    held = [s for s in _load(demo, "heldout.json")]
    held_names = {n for s in held for n in _images(s)}
    assert not train & held_names
    digest = lambda n: hashlib.sha256((demo / "images" / n).read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(n) for n in train} & {digest(n) for n in held_names}
    per_type = {q: [s for s in held if s["qtype"] == q] for q in QTYPES}
    assert all(len(v) == 5 for v in per_type.values())
    # Balanced answers: answer index cycles through the closed set.
    assert [s["answer"] for s in per_type["location"]][:4] == list(templates.LOCATIONS)
    assert [s["answer"] for s in per_type["choice"]][:4] == ["A", "B", "C", "D"]


def test_pmc_vqa_csv(demo):
    with open(demo / "pmc_vqa_style.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == SMALL["n_csv"]
    assert list(rows[0]) == make_demo.CSV_COLUMNS
    held_names = {n for s in _load(demo, "heldout.json") for n in _images(s)}
    for r in rows:
        assert r["Figure_path"] in held_names
        assert r["Answer_label"] in "ABCD"
        for letter in "ABCD":
            assert r[f"Choice {letter}"].startswith(f"{letter}:")
        assert r[f"Choice {r['Answer_label']}"] == f"{r['Answer_label']}:{r['Answer']}"


def test_size_limits(demo):
    meta = _load(demo, "meta.json")
    per_image = meta["total_bytes"] / meta["counts"]["images"]
    assert per_image < 4000
    # Extrapolate to the defaults (2000/3000/300, ~11% extra composite images): < 20 MB.
    assert per_image * 5300 * 1.15 < 20e6


@pytest.mark.slow
def test_default_size_and_speed(tmp_path):
    meta = generate(tmp_path / "full", seed=0)
    assert meta["total_bytes"] < 20e6
    assert meta["_seconds"] < 60
    assert all(v >= 40 for v in meta["counts"]["heldout_by_qtype"].values())


def test_normalize_answer():
    assert normalize_answer("左上方。", "location") == "左上"
    assert normalize_answer("病灶位于图像右下方", "location") == "右下"
    assert normalize_answer(" MRI ", "modality") == "磁共振"
    assert normalize_answer("X光片", "modality") == "X线"
    assert normalize_answer("ct", "modality") == "CT"
    assert normalize_answer("两个</s>", "count") == "2"
    assert normalize_answer("3", "count") == "3"
    assert normalize_answer("较大", "size") == "大"
    assert normalize_answer("B", "choice") == "B"
    assert normalize_answer("B:左上", "choice") == "B"
    assert normalize_answer("(C)", "choice") == "C"
    assert normalize_answer("答案是D", "choice") == "D"
    assert templates.choice_letter("左上", ["A:右上", "B:左上", "C:左下", "D:右下"]) == "B"
    for q, answers in ANSWER_SETS.items():
        for a in answers:
            assert normalize_answer(a, q) == a


# ---------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def test_tokenizer_loads_like_llama(tok):
    assert type(tok).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert len(tok) == 4000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.add_bos_token and not tok.add_eos_token
    ids = tok("左上").input_ids
    assert ids[0] == 1 and ids[-1] != 2
    assert tok("<s>").input_ids == [1, 1]  # special tokens in text are parsed, like LLaMA
    assert tok.convert_tokens_to_ids("<image>") == tok.unk_token_id  # no image token in the vocab
    assert tok.convert_ids_to_tokens(3) == "<0x00>" and tok.convert_ids_to_tokens(258) == "<0xFF>"
    # legacy=True: text after a special token gets the dummy-prefix piece.
    assert tok.tokenize("</s>USER:")[1].startswith("\u2581")


def test_tokenizer_roundtrip_chinese(tok):
    texts = [
        "颅脑磁共振图像，左上区域可见一个较小的低信号病灶。",
        "A chat between a curious user and an artificial intelligence assistant.",
        "这幅图像属于哪种成像方式？\nA:CT\nB:X线\nC:磁共振\nD:超声\n请直接回答选项字母。",
        "患者男性，65岁，咳嗽咳痰2周。",
    ] + list(templates.iter_texts(seed=7, n=30))
    for x in texts:
        ids = tok(x, add_special_tokens=False).input_ids
        assert 0 not in ids, x
        assert tok.decode(ids) == x


def test_tokenizer_byte_fallback(tok):
    x = "罕见字：龘𠮷䶮"
    ids = tok(x, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces)
    assert 0 not in ids and tok.decode(ids) == x


def test_tokenizer_covers_demo_text(tok):
    """Every character the generator emits has its own piece (no byte fallback on demo text)."""
    byte_ids = set(range(3, 259))
    for x in set(templates.iter_texts(seed=11, n=300)) | set(templates.all_template_strings()):
        for line in x.split("\n"):
            assert not byte_ids & set(tok(line, add_special_tokens=False).input_ids), line
    for answers in ANSWER_SETS.values():
        for a in answers:
            assert len(tok(a, add_special_tokens=False).input_ids) <= 2, a


def test_tokenizer_matches_sentencepiece_and_script(tmp_path, tok):
    import sentencepiece as spm

    from qilin_jax.demo_data.tokenizer import make_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    for x in list(templates.iter_texts(seed=3, n=50)):
        assert sp.encode(x) == tok(x, add_special_tokens=False).input_ids, x
    # The shipped model is what the script produces (deterministic; catches template drift).
    make_tokenizer.train(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (TOKENIZER_DIR / "tokenizer.model").read_bytes()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text()


def test_prepare_regenerates_data_made_with_other_options(tmp_path, monkeypatch, capsys):
    """main.py's prepare_demo reuses the data folder only when it was made with the options
    asked for; an option the config leaves out means generate()'s default, so data that an
    earlier run made with another value (demo.n_align=...) is regenerated, not reused."""
    from qilin_jax import demo as demo_task
    from qilin_jax.config import RunConfig

    small = dict(SMALL, n_csv=0)
    real = make_demo.generate

    def generate_small(
        out_dir,
        seed=0,
        n_align=small["n_align"],
        n_instruct=small["n_instruct"],
        n_heldout=small["n_heldout"],
        image_size=small["image_size"],
        n_csv=0,
    ):
        return real(
            out_dir,
            seed=seed,
            n_align=n_align,
            n_instruct=n_instruct,
            n_heldout=n_heldout,
            image_size=image_size,
            n_csv=n_csv,
        )

    monkeypatch.setattr(make_demo, "generate", generate_small)
    out = tmp_path / "gen"

    def prepare(**demo_opts):
        cfg = RunConfig(demo={"data_dir": str(out), **demo_opts})
        meta = demo_task.prepare(cfg)
        return meta["counts"]["alignment"], capsys.readouterr().out

    n, said = prepare(n_align=12)
    assert n == 12 and "generated" in said
    n, said = prepare(n_align=12)
    assert n == 12 and "already there" in said
    n, said = prepare()  # the default (30 here), not the 12 on disk
    assert n == small["n_align"] and "generated" in said
    n, said = prepare()
    assert "already there" in said
