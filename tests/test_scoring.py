"""Multiple-choice scoring by PMC-VQA's own rule ("official") beside letter parsing ("letter"):
the official rule on tricky answers, checked against difflib ratios computed here from the
rule's definition and against hand-derived outcomes; the PMC-VQA and demo reports carrying both
accuracies, by letter, with per-row decisions."""

import csv
import difflib
import json

import pytest

from qilin_jax.infer import evaluate as E
from qilin_jax.infer import letter_choice, official_choice, score_choice
from qilin_jax.infer.metrics import official_similarity, parse_choice

LETTERS = "ABCD"
# Choice strings as the PMC-VQA CSV writes them: a space, the letter, a colon, the text, a space.
EN = [" A:Diffuse uptake pattern ", " B:Focal uptake pattern ", " C:No uptake ", " D:Uptake in bone "]
ZH = ["A:左上", "B:右上", "C:左下", "D:右下"]
MOD = ["A:CT", "B:MRI", "C:X线", "D:超声"]


def benchmark_pick(text, choices):
    """The letter the benchmark's rule picks, from its definition: ratio of SequenceMatcher(None,
    choice, text) per choice (choice first, default junk settings), strict argmax over an initial
    best of 0, so the first choice wins ties and no choice is picked when every ratio is 0."""
    ratios = [difflib.SequenceMatcher(None, c, text).ratio() for c in choices]
    best, best_ratio = None, 0
    for i, r in enumerate(ratios):
        if r > best_ratio:
            best, best_ratio = LETTERS[i], r
    return best


def benchmark_correct(text, choices, gold):
    """Correct when the text's pick equals the gold choice string's pick (both by the rule)."""
    return benchmark_pick(text, choices) == benchmark_pick(choices[LETTERS.index(gold)], choices)


TRICKY = [
    # letters alone and in sentences
    ("B", EN, "B"),
    ("b", EN, "B"),
    ("(B)", EN, "B"),
    ("B.", ZH, "B"),
    ("Answer: B", EN, "B"),
    ("The answer is B.", EN, "B"),
    ("I think the answer is C", EN, "C"),
    ("答案是B", ZH, "B"),
    ("答案：D", ZH, "D"),
    ("答案是C", MOD, "C"),
    # full-width letters
    ("Ｂ", EN, "B"),
    ("Ｂ", ZH, "B"),
    ("答案是Ｃ", ZH, "C"),
    # option text, with and without its letter
    ("Focal uptake pattern", EN, "B"),
    ("B:Focal uptake pattern", EN, "B"),
    ("Uptake in bone", EN, "D"),
    ("右上", ZH, "B"),
    ("左下", ZH, "C"),
    ("超声", MOD, "D"),
    # option text inside a sentence
    ("The image shows a focal uptake pattern.", EN, "B"),
    ("There is no uptake in the lesion.", EN, "C"),
    ("病灶位于图像的右上方。", ZH, "B"),
    ("这是一张超声图像", MOD, "D"),
    # the other language
    ("局灶性摄取", EN, "B"),
    ("病灶位于左上", EN, "A"),
    ("right upper", ZH, "B"),
    ("Ultrasound", MOD, "D"),
    # empty, whitespace, a long answer (autojunk applies to the text once it has 200 characters)
    ("", EN, "A"),
    ("   ", EN, "A"),
    ("", ZH, "C"),
    ("The scan shows a focal uptake pattern in the left femur. " * 5, EN, "B"),
    # ties and no shared character
    (":", ZH, "A"),
    (":", ZH, "C"),
    ("上", ZH, "B"),
    ("xyz", ZH, "A"),
]


@pytest.mark.parametrize("text,choices,gold", TRICKY)
def test_official_rule_matches_its_definition(text, choices, gold):
    assert official_choice(text, choices) == benchmark_pick(text, choices)
    assert score_choice(text, choices, gold) is benchmark_correct(text, choices, gold)
    assert score_choice(text, choices, gold, rule="official") is benchmark_correct(text, choices, gold)
    # The letter rule is today's parse_choice, unchanged.
    assert letter_choice(text, choices) == parse_choice(text, choices)[0]
    assert score_choice(text, choices, gold, rule="letter") is (parse_choice(text, choices)[0] == gold)


def test_official_rule_hand_derived():
    # ratio = 2*M/T, M the matched characters, T both lengths added.
    # "B": only " B:Focal uptake pattern " (24 characters) holds "B" (bone has a lowercase b):
    # 2*1/25 = 0.08 against 0 elsewhere, so B.
    assert official_similarity(EN[1], "B") == pytest.approx(2 / 25)
    assert official_choice("B", EN) == "B" and score_choice("B", EN, "B")
    # Full-width "Ｂ" (U+FF22) shares no character with any choice: every ratio is 0, no choice
    # is picked, so it is wrong although the letter rule reads B.
    assert official_choice("Ｂ", EN) is None and not score_choice("Ｂ", EN, "B")
    assert score_choice("Ｂ", EN, "B", rule="letter")
    # Empty answer: every ratio is 0 -> no choice -> wrong, whatever the gold.
    assert official_choice("", EN) is None
    assert not any(score_choice("", EN, g) for g in LETTERS)
    # Chinese answer, English choices (and the reverse): nothing in common -> wrong.
    assert official_choice("局灶性摄取", EN) is None and not score_choice("局灶性摄取", EN, "B")
    assert official_choice("right upper", ZH) is None
    # Ties: "上" is in "A:左上" and "B:右上" (2*1/5 = 0.4 each), not in C or D; the first wins.
    assert official_choice("上", ZH) == "A"
    assert score_choice("上", ZH, "A") and not score_choice("上", ZH, "B")
    # ":" is in every choice, all 4 characters long: a four-way tie at 0.4, A wins.
    assert official_choice(":", ZH) == "A"
    # "答案是C" shares only "C" with "A:CT" and with "C:X线" (2*1/8 = 0.25 each): A wins the tie,
    # so the benchmark scores the answer C wrong while the letter rule reads C.
    assert official_choice("答案是C", MOD) == "A"
    assert not score_choice("答案是C", MOD, "C") and score_choice("答案是C", MOD, "C", rule="letter")
    # "答案是B": "B" is in "B:右上" only (2*1/8 = 0.25), so B.
    assert official_choice("答案是B", ZH) == "B"
    # The option's own text: "右上" matches 2 of "B:右上" (2*2/6 = 0.67) and 1 of "A:左上" / "D:右下"
    # (2*1/6 = 0.33), so B.
    assert official_choice("右上", ZH) == "B"


def test_argument_order_and_junk_settings():
    # ratio() is not symmetric: for "The answer is B." the choice-first order the benchmark uses
    # picks A, the text-first order would pick B. The rule must use the first.
    text = "The answer is B."
    swapped = max(range(4), key=lambda i: (difflib.SequenceMatcher(None, text, EN[i]).ratio(), -i))
    assert LETTERS[swapped] == "B"
    assert official_choice(text, EN) == benchmark_pick(text, EN) == "A"
    assert not score_choice(text, EN, "B") and score_choice(text, EN, "B", rule="letter")
    # difflib's default autojunk is kept: from 200 characters on, the text's frequent characters
    # are junk, which changes the ratio.
    long = "The scan shows a focal uptake pattern in the left femur. " * 5
    assert len(long) >= 200
    assert official_similarity(EN[1], long) == difflib.SequenceMatcher(None, EN[1], long).ratio()
    assert official_similarity(EN[1], long) != difflib.SequenceMatcher(None, EN[1], long, autojunk=False).ratio()


def test_score_choice_checks_its_arguments():
    with pytest.raises(ValueError, match="gold must be one of"):
        score_choice("B", EN, "E")
    with pytest.raises(ValueError, match="scoring rule"):
        score_choice("B", EN, "B", rule="fuzzy")
    with pytest.raises(TypeError, match="choice strings"):
        score_choice("B", {"A": "x"}, "A")
    assert score_choice("b", EN, " b ", rule="letter")  # the gold letter is read leniently


def _fake_answers(monkeypatch, answer_for):
    def fake(model, tokenizer, requests, opts, **kw):
        recs = {r.id: {"id": r.id, **r.echo, "answer": answer_for(r)} for r in requests if not r.error}
        return {"records": recs, "errors": [], "answered": len(recs), "reused": 0}

    monkeypatch.setattr(E, "answer_requests", fake)


def test_pmc_vqa_report_has_both_rules(demo_dir, tmp_path, monkeypatch):
    with open(demo_dir / "pmc_vqa_style.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    choices = [[r[f"Choice {x}"] for x in LETTERS] for r in rows]

    def answer(r):  # answers on which the rules agree and disagree
        i = int(r.id)
        row = rows[i]
        full_width = chr(ord(row["Answer_label"]) + 0xFEE0)  # "Ｂ"
        return [
            f"答案是{row['Answer_label']}",
            row["Answer"],
            full_width,
            f"The answer is {row['Answer_label']}.",
            "",
            f"病灶：{row['Answer']}。",
        ][i % 6]

    _fake_answers(monkeypatch, answer)
    out = tmp_path / "eval"
    from qilin_jax.infer.config import EvalConfig

    rep = E.run_eval(
        None,
        None,
        EvalConfig(
            task="pmc_vqa",
            csv=str(demo_dir / "pmc_vqa_style.csv"),
            image_folder=str(demo_dir / "images"),
            output_dir=str(out),
        ),
    )
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert rep["scoring"] == "official" and set(rep["scoring_rules"]) == {"official", "letter"}
    assert len(preds) == rep["n"] == len(rows)
    off = [benchmark_correct(p["answer"], choices[int(p["id"])], p["label"]) for p in preds]
    let = [parse_choice(p["answer"], choices[int(p["id"])])[0] == p["label"] for p in preds]
    assert rep["accuracy"] == pytest.approx(sum(off) / len(off))
    assert rep["accuracy_letter"] == pytest.approx(sum(let) / len(let))
    assert rep["accuracy"] < rep["accuracy_letter"]  # a full-width letter is never right officially
    assert rep["rules_disagree"] == sum(a != b for a, b in zip(off, let)) > 0
    for p, o, lt in zip(preds, off, let):
        assert p["choices"] == choices[int(p["id"])]
        assert p["pred"] == benchmark_pick(p["answer"], p["choices"]) and p["correct"] is o
        assert p["pred_letter"] == parse_choice(p["answer"], p["choices"])[0] and p["correct_letter"] is lt
        assert p["method"] == parse_choice(p["answer"], p["choices"])[1]
    for letter, s in rep["by_answer_letter"].items():
        idx = [k for k, p in enumerate(preds) if p["label"] == letter]
        assert s["n"] == len(idx)
        assert s["accuracy"] == pytest.approx(sum(off[k] for k in idx) / len(idx))
        assert s["accuracy_letter"] == pytest.approx(sum(let[k] for k in idx) / len(idx))
    assert sum(rep["predicted_letters"].values()) == sum(rep["predicted_letters_letter"].values()) == len(preds)
    assert rep["predicted_letters"]["None"] >= 1  # the empty answer picks nothing


def test_demo_report_names_its_choice_rule(demo_dir, tmp_path, monkeypatch):
    held = {h["id"]: h for h in json.loads((demo_dir / "heldout.json").read_text())}
    choice_ids = sorted(i for i, h in held.items() if h["qtype"] == "choice")
    assert len(choice_ids) == 2

    def answer(r):  # the first choice row answers with a full-width letter, the second with the text
        h = held[r.id]
        if h["qtype"] != "choice":
            return h["answer"]
        return chr(ord(h["answer"]) + 0xFEE0) if r.id == choice_ids[0] else h["answer_text"]

    _fake_answers(monkeypatch, answer)
    rep = E.evaluate_demo(None, None, str(demo_dir / "heldout.json"), output_dir=str(tmp_path))
    assert rep["choice_scoring"] == "official"
    by_rule = rep["choice_accuracy_by_rule"]
    exp_off = [
        benchmark_correct(answer(type("R", (), {"id": i})), held[i]["choices"], held[i]["answer"]) for i in choice_ids
    ]
    assert exp_off == [False, True]  # full-width letters share nothing with "A:..." choices
    assert by_rule == {"official": 0.5, "letter": 1.0}
    assert rep["heldout_accuracy_by_type"]["choice"] == by_rule["official"]
    rows = {p["id"]: p for p in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    for i in choice_ids:
        assert {"pred", "correct", "pred_letter", "correct_letter", "method"} <= set(rows[i])
    assert rows[choice_ids[0]]["pred"] is None and rows[choice_ids[0]]["pred_letter"] == held[choice_ids[0]]["answer"]


def test_demo_choice_row_without_choices_is_a_bad_record(demo_dir, tmp_path, monkeypatch):
    held = json.loads((demo_dir / "heldout.json").read_text())
    bad = next(h for h in held if h["qtype"] == "choice")
    rows = [dict(bad, choices=[])] + [h for h in held if h["id"] != bad["id"]]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    seen = {}

    def fake(model, tokenizer, requests, opts, **kw):
        seen.update({r.id: r for r in requests})
        recs = {r.id: {"id": r.id, **r.echo, "answer": "A"} for r in requests if not r.error}
        errs = [{"id": r.id, "reason": r.reason, "error": r.error} for r in requests if r.error]
        return {"records": recs, "errors": errs, "answered": len(recs), "reused": 0}

    monkeypatch.setattr(E, "answer_requests", fake)
    rep = E.evaluate_demo(None, None, str(path), image_folder=str(demo_dir / "images"))
    assert seen[bad["id"]].reason == "bad_record" and "'choices'" in seen[bad["id"]].error
    assert rep["skipped"] == 1 and rep["n"] == len(held) - 1 and rep["n_by_type"]["choice"] == 1
