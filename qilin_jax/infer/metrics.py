"""Scoring: multiple choice by PMC-VQA's own rule ("official") or by letter parsing with a
similarity fallback ("letter"), and open-ended exact match / character-level BLEU / ROUGE-L for
Chinese. No jax here (scoring runs anywhere).

The two multiple-choice rules (`score_choice`):
  official  PMC-VQA's evaluation: the generated text, unchanged, is compared with each choice
            string as written in the CSV (" A:text ") by difflib.SequenceMatcher(None, choice,
            text).ratio(); the choice with the strictly highest ratio is picked (the first one
            on ties, none when every ratio is 0), and the answer is correct when that is the
            option the gold choice string picks by the same rule. Published accuracies use it.
  letter    `parse_choice`: a letter or "answer is B" phrase first, then an option's text
            inside the answer, then the most similar option.

Every score is a fraction in [0, 1] (BLEU too: sacrebleu's 0-100 figure divided by 100).

Tokenization for BLEU/ROUGE/exact match (`char_tokens`): NFKC (full-width letters and digits
become ASCII), lowercased, each CJK character is one token, runs of Latin letters/digits are
one token (so English is word-level), punctuation and whitespace are dropped.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Mapping, Sequence

LETTERS = ("A", "B", "C", "D")

# --------------------------------------------------------------------------------------------
# Multiple choice

_OPEN = r"[\s\(\[（【「\"'“‘<]*"
_CLOSE_PUNCT = r"[.．。:：)）\]】」、,，;；!！\"'”’>]"
# "答案是B", "答案：(B)", "正确答案为 B", "选B", "选择 B", "the answer is B", "Answer: B",
# "option B", "choice (B)", "I choose B", "B选项", "B项".
_KEYWORD = re.compile(
    r"(?:正确答案|答案|选项|选择|应选|选|answer|option|choice|choose|select)"
    r"\s*(?:is|should be|would be|was|是|为|应该是|应为|应是)?\s*[:：=]?\s*(?:option|choice|选项)?\s*"
    r"[\(\[（【「\"']?\s*([A-Da-d])(?![A-Za-z])",
    re.IGNORECASE,
)
_LETTER_THEN_OPTION = re.compile(r"(?<![A-Za-z])([A-D])\s*(?:选项|项|是正确)")


def option_text(option: str, letter: str | None = None) -> str:
    """The option's text without its "A:" / "A." / "(A)" prefix."""
    t = unicodedata.normalize("NFKC", str(option)).strip()
    m = re.match(r"^[\(\[]?\s*([A-Da-d])\s*[:.)\]]\s*", t)
    if m and (letter is None or m.group(1).upper() == letter):
        return t[m.end() :].strip()
    return t


def _clean(text: str) -> str:
    t = unicodedata.normalize("NFKC", str(text)).replace("</s>", "")
    return t.strip()


def _squash(text: str) -> str:
    """Lowercased, punctuation and whitespace removed: for option-text containment."""
    t = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in t if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def similarity(a: str, b: str) -> float:
    """difflib ratio on squashed text: the letter rule's fallback (PMC-VQA's own is `official_similarity`)."""
    return difflib.SequenceMatcher(None, _squash(a), _squash(b)).ratio()


def parse_choice(text: str, options: Mapping[str, str] | Sequence[str] | None = None) -> tuple[str | None, str]:
    """(letter or None, how it was found) for a generated answer to a 4-option question.

    `options`: {"A": text, ...} or ["A:text", ...]. Methods, tried in order: "letter" (the
    answer is or starts with a letter: "B", "B.", "(b)", "Ｂ", "B: text"), "phrase" ("答案是B",
    "The answer is B"), "option_text" (an option's text appears in the answer), "similarity"
    (the most similar option, on lowercased text without punctuation), "none".
    """
    t = _clean(text)
    opts = _options_dict(options)
    if not t:
        return None, "none"
    # A lone letter, possibly bracketed or followed by punctuation: "B", "(B)", "b.", "B:".
    m = re.fullmatch(_OPEN + r"([A-Da-d])" + _CLOSE_PUNCT + r"*\s*", t)
    if m:
        return m.group(1).upper(), "letter"
    # An uppercase letter at the start followed by punctuation ("B. text", "(B) text", "B:"),
    # or a lowercase one followed by punctuation ("b) text"), never a word like "A lesion".
    m = re.match(_OPEN + r"([A-D])\s*(?:" + _CLOSE_PUNCT + r"|$)", t) or re.match(
        r"^[\s\(\[（【]*([a-d])\s*[.．:：)）\]】、]", t
    )
    if m:
        return m.group(1).upper(), "letter"
    m = _KEYWORD.search(t)
    if m and (m.group(1).isupper() or re.match(r"[a-d]\s*(?:$|" + _CLOSE_PUNCT + ")", t[m.start(1) :])):
        return m.group(1).upper(), "phrase"
    m = _LETTER_THEN_OPTION.search(t)
    if m:
        return m.group(1), "phrase"
    # An uppercase letter then a space and non-Latin text ("B 左上"), or the letter then the
    # text of that very option ("A 3 cm nodule" when option A is "3 cm nodule").
    m = re.match(_OPEN + r"([A-D])\s+(.*)$", t, re.S)
    if m:
        rest = m.group(2)
        if not re.match(r"[A-Za-z0-9]", rest) or (
            opts.get(m.group(1)) and _squash(opts[m.group(1)]) and _squash(rest).startswith(_squash(opts[m.group(1)]))
        ):
            return m.group(1), "letter"
    if not opts:
        return None, "none"
    # Option text inside the answer: the longest option text found wins (one contained in
    # another, e.g. "结节" and "多发结节", resolves to the longer).
    st = _squash(t)
    found = [(len(_squash(v)), k) for k, v in opts.items() if _squash(v) and _squash(v) in st]
    if found:
        found.sort(reverse=True)
        if len(found) == 1 or found[0][0] > found[1][0]:
            return found[0][1], "option_text"
    return most_similar_option(t, opts), "similarity"


def most_similar_option(text: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The letter of the option most similar to `text` (difflib ratio; ties go to the first)."""
    opts = _options_dict(options)
    best, best_score = None, -1.0
    for k in sorted(opts):
        s = max(similarity(text, opts[k]), similarity(text, f"{k}:{opts[k]}"))
        if s > best_score:
            best, best_score = k, s
    return best


SCORING_RULES = ("official", "letter")


def official_similarity(choice: str, text: str) -> float:
    """PMC-VQA's similarity of a choice string to a text: difflib ratio with the choice first."""
    # Argument order matters: ratio() is not symmetric (the matching-block search is greedy,
    # and autojunk drops frequent characters of the second string once it has 200 or more).
    return difflib.SequenceMatcher(None, choice, text).ratio()


def official_index(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice PMC-VQA's rule picks for `text` (strict argmax of the ratio), or None."""
    text = "" if text is None else str(text)
    best, best_ratio = None, 0.0  # strict ">" over 0: first choice wins ties, None if all are 0
    for i, choice in enumerate(_choice_strings(choices)):
        r = official_similarity(choice, text)
        if r > best_ratio:
            best, best_ratio = i, r
    return best


def official_choice(text: str, choices: Sequence[str]) -> str | None:
    """Letter of the choice PMC-VQA's rule picks for `text`, or None when no choice shares a character."""
    i = official_index(text, choices)
    return None if i is None else _letter(i)


def letter_choice(text: str, choices: Sequence[str] | Mapping[str, str]) -> str | None:
    """Letter the "letter" rule (`parse_choice`) picks for `text`, or None."""
    return parse_choice(text, choices)[0]


def choice_pick(text: str, choices: Sequence[str], rule: str = "official") -> str | None:
    """Letter `rule` ("official" or "letter") picks for `text`, or None."""
    if rule == "official":
        return official_choice(text, choices)
    if rule == "letter":
        return letter_choice(text, choices)
    raise ValueError(f"scoring rule must be one of {SCORING_RULES}, got {rule!r}")


def score_choice(text: str, choices: Sequence[str], gold: str, rule: str = "official") -> bool:
    """Whether `text` answers the question whose gold letter is `gold`, by `rule`.

    `choices`: the choice strings as in the CSV (" A:text ", ...), in letter order. "official"
    is PMC-VQA's decision: the option picked for the text equals the one picked for the gold
    choice string (the same option unless two choice strings are identical). "letter" is
    `parse_choice`'s letter equal to `gold`.
    """
    strings = _choice_strings(choices)
    g = str(gold).strip().upper()
    if g not in LETTERS[: len(strings)]:
        raise ValueError(f"gold must be one of {list(LETTERS[: len(strings)])} (the choices given), got {gold!r}")
    if rule == "official":
        return official_index(text, strings) == official_index(strings[LETTERS.index(g)], strings)
    return choice_pick(text, strings, rule) == g


def _letter(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else str(i)


def _choice_strings(choices) -> list[str]:
    if isinstance(choices, (str, bytes, Mapping)):
        raise TypeError(
            "choices must be the list of choice strings as in the CSV "
            f"([' A:text ', ' B:text ', ...]), got {type(choices).__name__}"
        )
    return ["" if c is None else str(c) for c in choices]


def _options_dict(options) -> dict[str, str]:
    if not options:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): option_text(v, str(k).strip().upper()) for k, v in options.items()}
    out = {}
    for i, o in enumerate(options):
        letter = LETTERS[i] if i < len(LETTERS) else str(i)
        out[letter] = option_text(o, letter)
    return out


def choice_accuracy(records: Sequence[Mapping]) -> dict:
    """Accuracy overall and by gold letter from records with "label" and "pred" keys.

    A record's "correct" (when present) is its decision, else "pred" == "label". Records that
    also carry the letter rule's decision ("pred_letter", "correct_letter") add
    "accuracy_letter" overall and per letter beside the main "accuracy".
    """

    def ok(r, suffix=""):
        key = "correct" + suffix
        return bool(r[key]) if key in r else r.get("pred" + suffix) == r.get("label")

    n = len(records)
    both = any("pred_letter" in r or "correct_letter" in r for r in records)
    correct = sum(ok(r) for r in records)
    by_letter = {}
    for letter in LETTERS:
        rs = [r for r in records if r.get("label") == letter]
        if rs:
            by_letter[letter] = {"n": len(rs), "accuracy": sum(ok(r) for r in rs) / len(rs)}
            if both:
                by_letter[letter]["accuracy_letter"] = sum(ok(r, "_letter") for r in rs) / len(rs)
    out = {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct}
    if both:
        correct_letter = sum(ok(r, "_letter") for r in records)
        out.update(accuracy_letter=correct_letter / n if n else 0.0, correct_letter=correct_letter)
    out.update(by_answer_letter=by_letter, predicted_letters=_counts(r.get("pred") for r in records))
    if both:
        out["predicted_letters_letter"] = _counts(r.get("pred_letter") for r in records)
        out["rules_disagree"] = sum(ok(r) != ok(r, "_letter") for r in records)
    out["parse_methods"] = _counts(r.get("method", "none") for r in records)
    return out


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# Open-ended answers


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x2FA1F
        or 0xF900 <= o <= 0xFAFF
        or 0x3040 <= o <= 0x30FF
        or 0xAC00 <= o <= 0xD7AF
    )


def char_tokens(text: str) -> list[str]:
    """Tokens for scoring: one per CJK character, one per Latin/digit run; punctuation dropped."""
    t = unicodedata.normalize("NFKC", str(text)).replace("</s>", "").lower()
    out: list[str] = []
    word = []
    for ch in t:
        if _is_cjk(ch):
            if word:
                out.append("".join(word))
                word = []
            out.append(ch)
        elif ch.isalnum():
            word.append(ch)
        else:  # whitespace, punctuation, symbols end a word
            if word:
                out.append("".join(word))
                word = []
    if word:
        out.append("".join(word))
    return out


def exact_match(pred: str, ref: str) -> bool:
    """Whether the answers are equal after `char_tokens` normalisation."""
    return char_tokens(pred) == char_tokens(ref)


def bleu(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu, exp smoothing, effective order) on `char_tokens`, in [0, 1]."""
    sacrebleu = _require("sacrebleu", "sacrebleu==2.6.0")
    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        return 0.0
    multi = [r if isinstance(r, (list, tuple)) else [r] for r in refs]
    k = max(len(r) for r in multi)
    streams = [[" ".join(char_tokens(r[i])) if i < len(r) else "" for r in multi] for i in range(k)]
    hyps = [" ".join(char_tokens(p)) for p in preds]
    # use_effective_order: n-gram orders with no n-gram in the whole corpus (answers of 1-3
    # characters) are left out of the mean instead of making BLEU 0.
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="none", force=True, use_effective_order=True).score / 100.0


def _require(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"open-ended scoring needs {module.split('.')[0]}: pip install {pip_name}") from None


class _CharTokenizer:
    """rouge_score tokenizer interface over `char_tokens` (its default drops all non-ASCII)."""

    def tokenize(self, text):
        return char_tokens(text)


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (rouge_score) on `char_tokens`."""
    global _ROUGE
    if _ROUGE is None:
        rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score==0.1.2")
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    return float(_ROUGE.score(ref, pred)["rougeL"].fmeasure)


def open_scores(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """Exact match, corpus BLEU-4 and mean ROUGE-L F1 (character-level for Chinese), fractions."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    if n == 0:
        return {"n": 0, "exact_match": 0.0, "bleu": 0.0, "rouge_l": 0.0}
    return {
        "n": n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "bleu": bleu(preds, refs),
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
    }
