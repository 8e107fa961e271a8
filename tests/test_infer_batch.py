"""Batch inference: JSONL/CSV in, JSONL out; interrupted runs resume without redoing or losing rows;
bad rows reported and skipped (or raised when strict)."""

import csv
import json

import pytest

from qilin_jax.data.errors import DataError
from qilin_jax.infer.batch import read_done, run_batch
from qilin_jax.infer.config import BatchConfig


def _rows(demo_dir):
    held = json.loads((demo_dir / "heldout.json").read_text())
    rows = [
        {"id": h["id"], "image": h["image"], "question": h["conversations"][0]["value"].replace("<image>\n", "")}
        for h in held[:7]
    ]
    rows.insert(3, {"id": "bad-image", "image": "nope.png", "question": "这是什么？"})
    rows.insert(5, {"id": "no-question", "image": held[0]["image"]})
    rows.append({"id": "text-only", "question": "你好"})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_resume_after_interruption(tiny_model, tokenizer, demo_dir, tmp_path):
    rows = _rows(demo_dir)
    inp = tmp_path / "q.jsonl"
    _write_jsonl(inp, rows)
    out = tmp_path / "answers.jsonl"
    cfg = BatchConfig(
        input=str(inp),
        output=str(out),
        image_folder=str(demo_dir / "images"),
        batch_size=3,
        max_new_tokens=5,
        limit=4,
        progress=False,
    )
    s1 = run_batch(tiny_model, tokenizer, cfg)  # "killed" after 4 rows (one of them bad)
    first = _lines(out)
    assert [r["id"] for r in first] == [rows[i]["id"] for i in (0, 1, 2)]
    assert s1["answered"] == 3 and [e["id"] for e in s1["errors"]] == ["bad-image"]
    assert "q.jsonl:4" in s1["errors"][0]["origin"] and s1["errors"][0]["reason"] == "missing_image"

    # A kill in the middle of a write leaves a torn last line: it is dropped and redone.
    with open(out, "a") as f:
        f.write('{"id": "' + rows[4]["id"] + '", "answ')
    cfg.limit = 0
    s2 = run_batch(tiny_model, tokenizer, cfg)
    final = _lines(out)
    good = [r["id"] for r in rows if r["id"] not in ("bad-image", "no-question")]
    assert sorted(r["id"] for r in final) == sorted(good)  # every good row exactly once
    assert final[:3] == first  # finished work untouched
    assert s2["reused"] == 3 and s2["answered"] == len(good) - 3
    assert {e["id"] for e in s2["errors"]} == {"bad-image", "no-question"}
    errors = _lines(tmp_path / "answers.errors.jsonl")
    assert {e["id"] for e in errors} == {"bad-image", "no-question"}

    # Nothing left to do: a third run answers nothing and leaves the file as it was.
    before = out.read_text()
    s3 = run_batch(tiny_model, tokenizer, cfg)
    assert s3["answered"] == 0 and out.read_text() == before

    # Answers do not depend on how the run was split: a fresh one-shot run gives the same.
    cfg2 = BatchConfig(
        input=str(inp),
        output=str(tmp_path / "fresh.jsonl"),
        image_folder=str(demo_dir / "images"),
        batch_size=3,
        max_new_tokens=5,
        progress=False,
    )
    run_batch(tiny_model, tokenizer, cfg2)
    fresh = {r["id"]: r for r in _lines(tmp_path / "fresh.jsonl")}
    assert {r["id"]: r for r in final} == fresh
    rec = fresh["text-only"]
    assert rec["image"] is None and rec["question"] == "你好" and isinstance(rec["answer"], str)
    assert 1 <= rec["num_tokens"] <= 5


def test_csv_input_strict_and_no_resume(tiny_model, tokenizer, demo_dir, tmp_path):
    rows = _rows(demo_dir)
    inp = tmp_path / "q.csv"
    with open(inp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "question"])
        w.writeheader()
        for r in rows[:3]:
            w.writerow({"id": r["id"], "image": r["image"], "question": r.get("question", "")})
    out = tmp_path / "a.jsonl"
    cfg = BatchConfig(
        input=str(inp),
        output=str(out),
        image_folder=str(demo_dir / "images"),
        batch_size=2,
        max_new_tokens=3,
        progress=False,
    )
    s = run_batch(tiny_model, tokenizer, cfg)
    assert s["answered"] == 3 and len(_lines(out)) == 3
    cfg.max_new_tokens = 4  # resuming with other settings would mix two set-ups in one file
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens differ"):
        run_batch(tiny_model, tokenizer, cfg)
    cfg.max_new_tokens, cfg.resume = 3, False
    with pytest.raises(FileExistsError, match="resume=true"):
        run_batch(tiny_model, tokenizer, cfg)

    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, rows[3:4])
    strict = BatchConfig(
        input=str(bad),
        output=str(tmp_path / "b.jsonl"),
        strict=True,
        progress=False,
        image_folder=str(demo_dir / "images"),
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:1 \(id bad-image\).*nope\.png"):
        run_batch(tiny_model, tokenizer, strict)


def test_duplicate_ids_and_corrupt_output_are_errors(tiny_model, tokenizer, tmp_path):
    inp = tmp_path / "dup.jsonl"
    _write_jsonl(inp, [{"id": "x", "question": "a"}, {"id": "x", "question": "b"}])
    with pytest.raises(ValueError, match=r"id 'x' appears at dup\.jsonl:1 and dup\.jsonl:2"):
        run_batch(tiny_model, tokenizer, BatchConfig(input=str(inp), progress=False))
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a", "answer": "x"}\nnot json\n{"id": "b", "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"o\.jsonl:2"):
        read_done(out)
