"""Evaluation: PMC-VQA multiple choice, the bundled demo task, open-ended answers.

`run_eval(model, tokenizer, eval_cfg)` writes into eval_cfg.output_dir:
    generations.jsonl   raw answers, one per sample id (appended per batch; a rerun resumes)
    predictions.jsonl   per sample: question, gold, answer, parsed prediction, correct
    report.json         the scores (the returned dict)

PMC-VQA: the prompt is the question, the four options ("A:...") and the answer-with-letter
instruction (en/zh), greedy. Each answer is scored by both rules of `metrics.score_choice`:
`accuracy` is the benchmark's own rule ("official", the number to compare with published
PMC-VQA results), `accuracy_letter` the letter-parsing rule; both overall and by gold letter,
and each prediction row keeps both decisions and the option each rule picked. Samples whose
image is missing are reported (`skipped`) and not scored.

Why one file (over 450 lines): the three evaluation tasks (PMC-VQA, the demo, open-ended)
share the generation, resume and report code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qilin_jax.data.errors import DataError
from qilin_jax.infer.batch import Request, answer_requests, request
from qilin_jax.infer.config import EvalConfig
from qilin_jax.infer.metrics import (
    LETTERS,
    choice_accuracy,
    exact_match,
    official_choice,
    open_scores,
    option_text,
    parse_choice,
    rouge_l,
    score_choice,
)

GENERATIONS = "generations.jsonl"
PREDICTIONS = "predictions.jsonl"
REPORT = "report.json"


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_report(report: dict, output_dir: str | os.PathLike) -> Path:
    """Write report.json into output_dir; returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / REPORT
    p.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return p


def _generate(model, tokenizer, reqs: list[Request], cfg: EvalConfig, output_dir, mesh, desc):
    out = Path(output_dir) / GENERATIONS if output_dir else None
    if out is not None and not cfg.resume:
        for f in (out, out.with_name(out.name + ".settings.json")):
            if f.exists():
                f.unlink()  # resume off: start over (the predictions are derived, never the source)
    return answer_requests(
        model,
        tokenizer,
        reqs,
        cfg,
        output=out,
        batch_size=cfg.batch_size,
        resume=cfg.resume,
        strict=cfg.strict,
        progress=cfg.progress,
        mesh=mesh,
        desc=desc,
    )


def _settings(cfg: EvalConfig) -> dict:
    return {
        "template": cfg.template,
        "image_mode": cfg.image_mode,
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "stop": list(cfg.stop),
    }


# --------------------------------------------------------------------------------------------
# PMC-VQA


def pmc_vqa_requests(
    csv_path: str, image_folder: str = "", language: str = "en", limit: int = 0
) -> list[tuple[Request, dict]]:
    """(Request, gold {"label", "options"}) per PMC-VQA CSV row; bad rows carry the error."""
    from qilin_jax.data.sources import PmcVqaCsvSource, pmc_vqa_conversation

    src = PmcVqaCsvSource([csv_path], image_folder)
    n = len(src) if not limit else min(limit, len(src))
    out = []
    for i in range(n):
        item = src[i]
        row, origin = item["row"], item["origin"]
        rid = str(i)  # Figure_path is not unique (several questions per figure); the row is
        try:
            conv = pmc_vqa_conversation(row, "choice", language)
            name = (row.get("Figure_path") or "").strip()
            if not name:
                raise DataError("bad_record", "empty or missing 'Figure_path'")
            q = conv[0]["value"].replace("<image>\n", "", 1)
            options = {x: option_text(row.get(f"Choice {x}") or "", x) for x in LETTERS}
            req = request(rid, q, [name], image_folder=image_folder, origin=origin, echo={"image": name})
            # "choices": the CSV's strings untouched, which the official rule compares with.
            gold = {
                "label": conv[1]["value"],
                "options": options,
                "choices": [row.get(f"Choice {x}") or "" for x in LETTERS],
                "question": (row.get("Question") or "").strip(),
            }
        except DataError as e:
            req = Request(rid, [], origin=origin, error=str(e), reason=e.reason)
            gold = {}
        out.append((req, gold))
    return out


SCORING_NOTE = {
    "official": "PMC-VQA's own rule: the choice string (as in the CSV) with the strictly highest "
    "difflib.SequenceMatcher(None, choice, answer).ratio() (first on ties, none when all "
    "are 0) must be the one the gold choice string picks",
    "letter": "letter parsing (a letter, 'answer is B', an option's text in the answer), then the most similar option",
}


def score_row(answer: str, choices: list[str], label: str) -> dict:
    """Both rules' decisions on one multiple-choice answer: pred/correct (official), *_letter, method."""
    letter, method = parse_choice(answer, choices)
    return {
        "pred": official_choice(answer, choices),
        "correct": score_choice(answer, choices, label, "official"),
        "pred_letter": letter,
        "method": method,
        "correct_letter": letter == label,
    }


def evaluate_pmc_vqa(model, tokenizer, cfg: EvalConfig, *, mesh=None) -> dict:
    """PMC-VQA accuracy by the benchmark's rule and by letter parsing, overall and by gold
    letter; writes the predictions and the report."""
    pairs = pmc_vqa_requests(cfg.csv, cfg.image_folder, cfg.language, cfg.limit)
    t0 = time.time()
    res = _generate(model, tokenizer, [r for r, _ in pairs], cfg, cfg.output_dir, mesh, "pmc-vqa")
    preds = []
    for req, gold in pairs:
        rec = res["records"].get(req.id)
        if rec is None or not gold:
            continue
        preds.append(
            {
                "id": req.id,
                "image": rec.get("image"),
                "question": gold["question"],
                "options": gold["options"],
                "choices": gold["choices"],
                "label": gold["label"],
                "answer": rec["answer"],
                **score_row(rec["answer"], gold["choices"], gold["label"]),
            }
        )
    scores = choice_accuracy(preds)
    report = {
        "task": "pmc_vqa",
        "csv": cfg.csv,
        "language": cfg.language,
        "scoring": "official",
        "scoring_rules": SCORING_NOTE,
        **scores,
        "chance": 0.25,
        "skipped": len(res["errors"]),
        "skipped_rows": res["errors"][:50],
        "seconds": round(time.time() - t0, 2),
        "settings": _settings(cfg),
    }
    if cfg.output_dir:
        _write_jsonl(Path(cfg.output_dir) / PREDICTIONS, preds)
        write_report(report, cfg.output_dir)
    return report


# --------------------------------------------------------------------------------------------
# The demo task (qilin_jax/demo_data)


def _demo_helpers():
    from qilin_jax.demo_data import make_demo  # ships with the package (no checkout needed)

    return make_demo


def evaluate_demo(
    model,
    tokenizer,
    heldout_json: str,
    image_folder: str = "",
    *,
    output_dir: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    template: str = "v1",
    image_mode: str = "pad",
    limit: int = 0,
    progress: bool = False,
    mesh=None,
    cfg: EvalConfig | None = None,
) -> dict:
    """Held-out accuracy of the demo task overall and per question type, chance beside it.

    Returns {"heldout_accuracy", "heldout_accuracy_by_type": {qtype: acc}, "chance_by_type",
    "n_by_type", "choice_scoring", "choice_accuracy_by_rule", ...}. Closed-set answers are
    compared after the demo's `normalize_answer`; multiple-choice rows by PMC-VQA's official
    rule (`score_choice`, named in "choice_scoring"; that is the "choice" entry and what
    heldout_accuracy counts), with the letter rule's accuracy beside it in
    "choice_accuracy_by_rule". image_folder defaults to <dir of heldout.json>/images.
    """
    demo = _demo_helpers()
    if cfg is None:
        cfg = EvalConfig(
            task="demo",
            json=heldout_json,
            image_folder=image_folder,
            output_dir=output_dir or "",
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            template=template,
            image_mode=image_mode,
            limit=limit,
            progress=progress,
        )
    image_folder = cfg.image_folder or str(Path(heldout_json).parent / "images")
    rows = json.loads(Path(heldout_json).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{heldout_json}: expected a JSON list of held-out samples")
    if cfg.limit:
        rows = rows[: cfg.limit]
    reqs, golds = [], {}
    for i, row in enumerate(rows):
        origin = f"{Path(heldout_json).name}[{i}]"
        rid = str(row.get("id", f"row-{i}"))
        try:
            q = next(t["value"] for t in row["conversations"] if t.get("from") == "human")
            ims = row["image"] if isinstance(row["image"], list) else [row["image"]]
            if row["qtype"] == "choice" and not row.get("choices"):
                raise KeyError("choices")  # the options both scoring rules compare with
            reqs.append(
                request(
                    rid,
                    q,
                    ims,
                    image_folder=image_folder,
                    origin=origin,
                    echo={"image": row["image"], "qtype": row["qtype"]},
                )
            )
            golds[rid] = row
        except (KeyError, StopIteration, TypeError) as e:
            reqs.append(
                Request(
                    rid,
                    [],
                    origin=origin,
                    reason="bad_record",
                    error=f"held-out row lacks {e}; regenerate with qilin_jax/demo_data/make_demo.py",
                )
            )
    t0 = time.time()
    res = _generate(model, tokenizer, reqs, cfg, cfg.output_dir or None, mesh, "demo eval")
    preds = []
    for rid, row in golds.items():
        rec = res["records"].get(rid)
        if rec is None:
            continue
        qtype = row["qtype"]
        gold = demo.normalize_answer(row["answer"], qtype)
        p = {
            "id": rid,
            "qtype": qtype,
            "question": row["conversations"][0]["value"],
            "answer": rec["answer"],
            "gold": gold,
        }
        if qtype == "choice":
            p.update(choices=row["choices"], **score_row(rec["answer"], row["choices"], gold))
        else:
            pred = demo.normalize_answer(rec["answer"], qtype)
            p.update(pred=pred, correct=pred == gold)
        preds.append(p)
    by_type, n_by_type = {}, {}
    for q in demo.QTYPES:
        rs = [p for p in preds if p["qtype"] == q]
        if rs:
            n_by_type[q] = len(rs)
            by_type[q] = sum(p["correct"] for p in rs) / len(rs)
    n = len(preds)
    choice_rows = [p for p in preds if p["qtype"] == "choice"]
    by_rule = (
        {
            rule: sum(p[key] for p in choice_rows) / len(choice_rows)
            for rule, key in (("official", "correct"), ("letter", "correct_letter"))
        }
        if choice_rows
        else {}
    )
    report = {
        "task": "demo",
        "heldout_accuracy": sum(p["correct"] for p in preds) / n if n else 0.0,
        "heldout_accuracy_by_type": by_type,
        "chance_by_type": {q: demo.CHANCE[q] for q in by_type},
        "choice_scoring": "official",
        "choice_accuracy_by_rule": by_rule,
        "scoring_rules": SCORING_NOTE,
        "n": n,
        "n_by_type": n_by_type,
        "skipped": len(res["errors"]),
        "seconds": round(time.time() - t0, 2),
        "settings": _settings(cfg),
    }
    if cfg.output_dir:
        _write_jsonl(Path(cfg.output_dir) / PREDICTIONS, preds)
        write_report(report, cfg.output_dir)
    return report


# --------------------------------------------------------------------------------------------
# Open-ended answers


def open_requests(cfg: EvalConfig) -> list[tuple[Request, str]]:
    """(Request, reference answer) from a LLaVA-style JSON/JSONL or a PMC-VQA CSV (Answer column)."""
    out = []
    if cfg.csv:
        from qilin_jax.data.sources import PmcVqaCsvSource, pmc_vqa_conversation

        src = PmcVqaCsvSource([cfg.csv], cfg.image_folder)
        for i in range(len(src)):
            row, origin = src[i]["row"], src[i]["origin"]
            try:
                conv = pmc_vqa_conversation(row, "open")
                name = (row.get("Figure_path") or "").strip()
                out.append(
                    (
                        request(
                            str(i),
                            conv[0]["value"],
                            [name] if name else [],
                            image_folder=cfg.image_folder,
                            origin=origin,
                            echo={"image": name},
                        ),
                        conv[1]["value"],
                    )
                )
            except DataError as e:
                out.append((Request(str(i), [], origin=origin, error=str(e), reason=e.reason), ""))
    else:
        from qilin_jax.infer.batch import _read_rows

        for i, (origin, row) in enumerate(_read_rows(cfg.json)):
            rid = str(row.get("id", f"row-{i}")) if isinstance(row, dict) else f"row-{i}"
            try:
                if not isinstance(row, dict):
                    raise DataError("bad_record", f"not a JSON object: {row!s:.80}")
                if "conversations" in row:
                    conv = row["conversations"]
                    q = next(t["value"] for t in conv if t.get("from") == "human")
                    ref = next(t["value"] for t in conv if t.get("from") == "gpt")
                else:
                    q, ref = row["question"], row["answer"]
                im = row.get("image")
                ims = [] if not im else (im if isinstance(im, list) else [im])
                out.append(
                    (request(rid, q, ims, image_folder=cfg.image_folder, origin=origin, echo={"image": im}), str(ref))
                )
            except (KeyError, StopIteration, TypeError) as e:
                out.append(
                    (
                        Request(
                            rid,
                            [],
                            origin=origin,
                            reason="bad_record",
                            error=f"needs conversations (human + gpt) or question + answer; missing {e}",
                        ),
                        "",
                    )
                )
            except DataError as e:
                out.append((Request(rid, [], origin=origin, reason=e.reason, error=str(e)), ""))
    if cfg.limit:
        out = out[: cfg.limit]
    ids = [r.id for r, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{cfg.json or cfg.csv}: id {dup!r} appears more than once; make ids unique")
    return out


def evaluate_open(model, tokenizer, cfg: EvalConfig, *, mesh=None) -> dict:
    """Exact match, character-level BLEU-4 and ROUGE-L of open-ended answers; writes predictions and report."""
    pairs = open_requests(cfg)
    t0 = time.time()
    res = _generate(model, tokenizer, [r for r, _ in pairs], cfg, cfg.output_dir, mesh, "open eval")
    preds = []
    for req, ref in pairs:
        rec = res["records"].get(req.id)
        if rec is None or req.error:
            continue
        preds.append(
            {
                "id": req.id,
                "image": rec.get("image"),
                "reference": ref,
                "answer": rec["answer"],
                "exact_match": exact_match(rec["answer"], ref),
                "rouge_l": round(rouge_l(rec["answer"], ref), 6),
            }
        )
    scores = open_scores([p["answer"] for p in preds], [p["reference"] for p in preds])
    report = {
        "task": "open",
        "source": cfg.json or cfg.csv,
        **scores,
        "skipped": len(res["errors"]),
        "skipped_rows": res["errors"][:50],
        "seconds": round(time.time() - t0, 2),
        "settings": _settings(cfg),
        "tokenization": "character-level for CJK, word-level for Latin, punctuation dropped",
    }
    if cfg.output_dir:
        _write_jsonl(Path(cfg.output_dir) / PREDICTIONS, preds)
        write_report(report, cfg.output_dir)
    return report


def run_eval(model, tokenizer, eval_cfg: EvalConfig, *, mesh=None) -> dict:
    """Run the configured evaluation; writes report.json + predictions.jsonl into output_dir, returns the report."""
    eval_cfg.validate("eval")
    if eval_cfg.task == "pmc_vqa":
        report = evaluate_pmc_vqa(model, tokenizer, eval_cfg, mesh=mesh)
        headline = (
            f"PMC-VQA accuracy {report['accuracy']:.4f} (the benchmark's rule; letter parsing "
            f"{report['accuracy_letter']:.4f}) on {report['n']} samples (chance 0.25)"
        )
    elif eval_cfg.task == "demo":
        report = evaluate_demo(model, tokenizer, eval_cfg.json, eval_cfg.image_folder, mesh=mesh, cfg=eval_cfg)
        per = ", ".join(
            f"{k} {v:.3f} (chance {report['chance_by_type'][k]:.2f})"
            for k, v in report["heldout_accuracy_by_type"].items()
        )
        headline = f"demo held-out accuracy {report['heldout_accuracy']:.4f}: {per}"
        if report["choice_accuracy_by_rule"]:
            headline += (
                f"; choice scored by PMC-VQA's rule (letter parsing {report['choice_accuracy_by_rule']['letter']:.3f})"
            )
    else:
        report = evaluate_open(model, tokenizer, eval_cfg, mesh=mesh)
        headline = (
            f"open-ended: exact match {report['exact_match']:.4f}, BLEU-4 {report['bleu']:.4f}, "
            f"ROUGE-L {report['rouge_l']:.4f} on {report['n']} samples"
        )
    if report.get("skipped"):
        headline += f"; {report['skipped']} skipped (see report.json)"
    print(headline, file=sys.stderr)
    if eval_cfg.output_dir:
        print(f"report: {Path(eval_cfg.output_dir) / REPORT}", file=sys.stderr)
    return report
