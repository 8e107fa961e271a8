"""Scoring: letter parsing on tricky outputs, the similarity fallback, metrics against hand-computed
values, and incremental decoding of a token stream (byte fallback, stop strings)."""

import pytest

from qilin_jax.infer.metrics import (
    bleu,
    char_tokens,
    choice_accuracy,
    exact_match,
    most_similar_option,
    open_scores,
    option_text,
    parse_choice,
    rouge_l,
)

ZH = {"A": "CT", "B": "X线", "C": "磁共振", "D": "超声"}
EN = ["A: Nodule in the left lung", "B: Pleural effusion", "C: 3 cm mass", "D: Normal chest"]


@pytest.mark.parametrize(
    "text,options,letter,method",
    [
        ("B", ZH, "B", "letter"),
        ("B.", ZH, "B", "letter"),
        ("(B)", ZH, "B", "letter"),
        ("【B】", ZH, "B", "letter"),
        ("b", ZH, "B", "letter"),
        ("Ｂ", ZH, "B", "letter"),  # full-width
        ("B: Pleural effusion", EN, "B", "letter"),
        ("b) pleural effusion", EN, "B", "letter"),
        ("B 左上", ZH, "B", "letter"),
        ("答案是B", ZH, "B", "phrase"),
        ("答案：Ｃ．磁共振", ZH, "C", "phrase"),
        ("正确答案为：D", ZH, "D", "phrase"),
        ("C选项", ZH, "C", "phrase"),
        ("The answer is B: pleural effusion.", EN, "B", "phrase"),
        ("Answer: (C)", EN, "C", "phrase"),
        ("I think the answer is d.", EN, "D", "phrase"),
        ("这是一张磁共振图像", ZH, "C", "option_text"),
        ("Pleural effusion is seen on the right.", EN, "B", "option_text"),
        # English article "A" is not a letter answer: the option text decides.
        ("A 3 cm mass in the right lobe", EN, "C", "option_text"),
        ("A lesion in the left lung", EN, "A", "similarity"),
        ("normal", EN, "D", "similarity"),
        ("", ZH, None, "none"),
    ],
)
def test_parse_choice_tricky_outputs(text, options, letter, method):
    assert parse_choice(text, options) == (letter, method)


def test_option_text_and_similarity_fallback():
    assert option_text("A:CT") == "CT"
    assert option_text(" B. Pleural effusion") == "Pleural effusion"
    assert option_text("(C) 3 cm mass") == "3 cm mass"
    # No letter and no option contained: the most similar option (difflib ratio), as PMC-VQA does.
    assert most_similar_option("磁共振成像", ZH) == "C"
    assert most_similar_option("pleural effusions", EN) == "B"
    assert parse_choice("chest normal", EN) == ("D", "similarity")
    # The longer of two contained options wins ("多发结节" contains "结节").
    assert parse_choice("可见多发结节", {"A": "结节", "B": "多发结节", "C": "钙化", "D": "正常"}) == (
        "B",
        "option_text",
    )


def test_choice_accuracy_by_letter():
    recs = [
        {"label": "A", "pred": "A"},
        {"label": "A", "pred": "B"},
        {"label": "B", "pred": "B"},
        {"label": "C", "pred": None},
    ]
    out = choice_accuracy(recs)
    assert out["accuracy"] == 0.5 and out["n"] == 4 and out["correct"] == 2
    assert out["by_answer_letter"] == {
        "A": {"n": 2, "accuracy": 0.5},
        "B": {"n": 1, "accuracy": 1.0},
        "C": {"n": 1, "accuracy": 0.0},
    }
    assert out["predicted_letters"] == {"A": 1, "B": 2, "None": 1}


def test_char_tokens_and_exact_match():
    assert char_tokens("CT显示 3cm 结节，Ｂ超。") == ["ct", "显", "示", "3cm", "结", "节", "b", "超"]
    assert exact_match("左上。", " 左上 ")
    assert exact_match("ＣＴ", "ct")
    assert not exact_match("左上", "右上")


def test_rouge_l_hand_computed():
    # LCS("右肺上叶有结节", "左肺上叶结节") = 肺上叶结节 = 5; P = 5/7, R = 5/6, F = 2PR/(P+R) = 10/13.
    assert rouge_l("右肺上叶有结节", "左肺上叶结节") == pytest.approx(10 / 13)
    assert rouge_l("左肺上叶结节", "左肺上叶结节") == pytest.approx(1.0)
    assert rouge_l("", "左肺") == 0.0


def test_bleu_hand_computed():
    # 4 characters, last one wrong: n-gram precisions 3/4, 2/3, 1/2, 0/1; sacrebleu's "exp"
    # smoothing turns the zero into 1/(2*1). Same length: brevity penalty 1.
    expected = (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert bleu(["左肺上叶"], ["左肺上野"]) == pytest.approx(expected)
    assert bleu(["左肺上叶结节"], ["左肺上叶结节"]) == pytest.approx(1.0)
    # Brevity penalty: hypothesis 4 of reference 5 characters, all 4-gram-precise: exp(1 - 5/4).
    import math

    assert bleu(["左肺上叶"], ["左肺上叶结"]) == pytest.approx(math.exp(1 - 5 / 4))
    # Answers shorter than 4 characters: only the n-gram orders that exist are averaged.
    assert bleu(["左上"], ["左上"]) == pytest.approx(1.0)
    assert bleu(["左上"], ["左下"]) == pytest.approx((0.5 * 0.5) ** 0.5)  # 1/2, then 0 -> 1/(2*1)
    s = open_scores(["左上", "右肺上叶有结节"], ["左上", "左肺上叶结节"])
    assert s["n"] == 2 and s["exact_match"] == 0.5
    assert s["rouge_l"] == pytest.approx((1 + 10 / 13) / 2)


def test_incremental_decoder_chinese_bytes_and_stops(tokenizer):
    from qilin_jax.infer.common import IncrementalDecoder

    # "龘" is not in the demo vocabulary: three byte-fallback tokens, printed only when complete.
    text = "答案是 B . 龘 hello USER: more"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    dec = IncrementalDecoder(tokenizer, stops=["</s>", "USER:"])
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "龘" in pieces  # the whole character in one piece
    assert "".join(pieces).strip() == "答案是 B . 龘 hello"
    assert dec.stopped and dec.text == "答案是 B . 龘 hello"
    # eos ends the answer; nothing after it is printed.
    dec = IncrementalDecoder(tokenizer)
    out = "".join(
        dec.push(t) for t in tokenizer("左上", add_special_tokens=False).input_ids + [tokenizer.eos_token_id] + ids
    )
    assert out == "左上" and dec.text == "左上"
