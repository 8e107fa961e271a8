"""Evaluation end to end on the generated demo data: PMC-VQA CSV (prompt, parsing, accuracy by
letter, files, resume), the demo task report (the keys issue 7 reads), open-ended metrics."""

import csv
import json

import pytest

from qilin_jax.infer import evaluate as E
from qilin_jax.infer.config import EvalConfig


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pmc_vqa_prompt_languages(demo_dir):
    for lang, suffix in (
        ("en", "Answer with the option's letter from the given choices directly."),
        ("zh", "请直接回答选项字母。"),
    ):
        pairs = E.pmc_vqa_requests(str(demo_dir / "pmc_vqa_style.csv"), str(demo_dir / "images"), lang)
        req, gold = pairs[0]
        q = req.turns[0]["value"]
        assert q.startswith("<image>\n") and q.endswith("\n" + suffix)
        for letter in "ABCD":
            assert f"\n{letter}:" in q
        assert gold["label"] in "ABCD" and set(gold["options"]) == set("ABCD")
        assert not any(v.startswith(("A:", "B:", "C:", "D:")) for v in gold["options"].values())


def test_pmc_vqa_csv_end_to_end(tiny_model, tokenizer, demo_dir, tmp_path):
    # The generated CSV plus one row whose figure is missing: reported, not scored.
    src = demo_dir / "pmc_vqa_style.csv"
    rows = list(csv.DictReader(open(src, encoding="utf-8")))
    rows.append(dict(rows[0], Figure_path="missing.png"))
    csv_path = tmp_path / "test.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "eval"
    cfg = EvalConfig(
        task="pmc_vqa",
        csv=str(csv_path),
        image_folder=str(demo_dir / "images"),
        output_dir=str(out),
        batch_size=4,
        max_new_tokens=6,
        progress=False,
    )
    report = E.run_eval(tiny_model, tokenizer, cfg)
    assert json.loads((out / "report.json").read_text()) == report
    preds = _lines(out / "predictions.jsonl")
    assert report["n"] == len(preds) == len(rows) - 1 and report["skipped"] == 1
    assert report["skipped_rows"][0]["reason"] == "missing_image"
    for p in preds:
        # "pred"/"correct": the benchmark's rule (it may pick none); "pred_letter": letter parsing.
        assert p["pred_letter"] in ("A", "B", "C", "D")  # the similarity fallback always picks one
        assert p["correct"] == (p["pred"] == p["label"])
        assert (p["pred_letter"], p["method"]) == E.parse_choice(p["answer"], p["options"])
    assert report["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    for letter, s in report["by_answer_letter"].items():
        mine = [p for p in preds if p["label"] == letter]
        assert s["n"] == len(mine)
        assert s["accuracy"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))
    assert report["chance"] == 0.25
    # A rerun resumes from generations.jsonl: nothing is generated again, same report.
    gens = (out / "generations.jsonl").read_text()
    calls = []
    real = E.answer_requests
    E.answer_requests = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        again = E.run_eval(tiny_model, tokenizer, cfg)
    finally:
        E.answer_requests = real
    assert (out / "generations.jsonl").read_text() == gens
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}


def _fake_answers(monkeypatch, answer_for):
    """Replace generation with answers derived from the request (scoring tests, no model)."""

    def fake(model, tokenizer, requests, opts, **kw):
        recs = {r.id: {"id": r.id, **r.echo, "answer": answer_for(r)} for r in requests if not r.error}
        return {"records": recs, "errors": [], "answered": len(recs), "reused": 0}

    monkeypatch.setattr(E, "answer_requests", fake)


def test_demo_report_perfect_and_wrong_answers(demo_dir, tmp_path, monkeypatch):
    held = {h["id"]: h for h in json.loads((demo_dir / "heldout.json").read_text())}

    # Answers as a trained model phrases them (sentences, "答案是B"): all must score as correct.
    def good(r):
        h = held[r.id]
        return f"答案是{h['answer']}" if h["qtype"] == "choice" else f"病灶：{h['answer']}。"

    _fake_answers(monkeypatch, good)
    rep = E.evaluate_demo(None, None, str(demo_dir / "heldout.json"), output_dir=str(tmp_path))
    assert rep["heldout_accuracy"] == 1.0
    assert set(rep["heldout_accuracy_by_type"]) >= {"location", "modality"}
    assert all(v == 1.0 for v in rep["heldout_accuracy_by_type"].values())
    assert rep["chance_by_type"]["location"] == 0.25 and rep["chance_by_type"]["size"] == pytest.approx(1 / 3)
    assert sum(rep["n_by_type"].values()) == rep["n"] == len(held)
    assert json.loads((tmp_path / "report.json").read_text())["heldout_accuracy"] == 1.0
    _fake_answers(monkeypatch, lambda r: "不知道")
    rep = E.evaluate_demo(None, None, str(demo_dir / "heldout.json"))
    assert rep["heldout_accuracy_by_type"]["location"] == 0.0


def test_demo_with_model_runs_from_run_eval(tiny_model, tokenizer, demo_dir, tmp_path):
    cfg = EvalConfig(
        task="demo",
        json=str(demo_dir / "heldout.json"),
        output_dir=str(tmp_path),
        batch_size=4,
        max_new_tokens=4,
        progress=False,
    )
    rep = E.run_eval(tiny_model, tokenizer, cfg)
    assert 0.0 <= rep["heldout_accuracy"] <= 1.0 and rep["n"] == 10
    assert {"location", "modality", "count", "size", "choice"} == set(rep["heldout_accuracy_by_type"])


def test_open_ended_metrics(tmp_path, monkeypatch):
    rows = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [{"from": "human", "value": "<image>\n位置？"}, {"from": "gpt", "value": "左肺上叶结节"}],
        },
        {"id": "b", "question": "模态？", "answer": "左上"},
    ]
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _fake_answers(monkeypatch, lambda r: {"a": "右肺上叶有结节", "b": "左上。"}[r.id])
    rep = E.run_eval(None, None, EvalConfig(task="open", json=str(path), output_dir=str(tmp_path / "o")))
    assert rep["n"] == 2 and rep["exact_match"] == 0.5
    assert rep["rouge_l"] == pytest.approx((10 / 13 + 1) / 2)
    preds = {p["id"]: p for p in _lines(tmp_path / "o" / "predictions.jsonl")}
    assert preds["b"]["exact_match"] and not preds["a"]["exact_match"]
    assert 0 < rep["bleu"] < 1


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="eval.csv is empty"):
        EvalConfig(task="pmc_vqa").validate()
    with pytest.raises(ValueError, match="eval.language"):
        EvalConfig(task="pmc_vqa", csv="x.csv", language="fr").validate()
    from qilin_jax.infer.config import ChatConfig, section_from_dict

    with pytest.raises(ValueError, match=r"chat: unknown key\(s\) \['temprature'\]"):
        section_from_dict(ChatConfig, {"temprature": 0.2}, "chat")
