"""Text side of the bundled demo task: vocabulary, caption/question templates, answer sets.

Everything the demo generator writes as text comes from this module, so the demo tokenizer
(qilin_jax/demo_data/tokenizer/make_tokenizer.py) can import it and cover all of it. Locations are IMAGE
quadrants as seen on screen (not patient left/right, which radiology mirrors).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

import numpy as np

# ---------------------------------------------------------------------------------------------
# Closed vocabulary of a case
# ---------------------------------------------------------------------------------------------
MODALITY_KEYS = ("ct", "xray", "us", "mr")
MODALITY_ANSWER = {"ct": "CT", "xray": "X线", "us": "超声", "mr": "磁共振"}
MODALITY_DESC = {
    "ct": ("腹部CT横断面图像", "CT轴位平扫图像", "腹部CT图像"),
    "xray": ("胸部X线正位片", "胸部X线平片", "X线胸片"),
    "us": ("腹部超声图像", "超声扇形扫描图像", "肝脏超声图像"),
    "mr": ("颅脑磁共振图像", "头部MRI T2加权图像", "脑部磁共振横断面图像"),
}
# Lesion kind by modality and appearance ("bright" = brighter than surroundings).
KINDS = {
    "ct": {"bright": "高密度结节", "dark": "低密度病灶"},
    "xray": {"bright": "结节影"},
    "us": {"bright": "高回声结节", "dark": "低回声结节"},
    "mr": {"bright": "高信号病灶", "dark": "低信号病灶"},
}
ALL_KINDS = tuple(k for m in MODALITY_KEYS for k in KINDS[m].values())
LOCATIONS = ("左上", "右上", "左下", "右下")
LOCATION_PHRASE = {"左上": "图像左上方", "右上": "图像右上方", "左下": "图像左下方", "右下": "图像右下方"}
SIZES = ("小", "中", "大")
SIZE_PHRASE = {"小": "较小的", "中": "中等大小的", "大": "较大的"}
SIZE_MM = {"小": "直径约5毫米", "中": "直径约1厘米", "大": "直径约2厘米"}
COUNT_CN = {1: "一个", 2: "两个", 3: "三个"}
MAX_COUNT = 3

QTYPES = ("location", "modality", "count", "size", "choice")
# The closed answer set per question type; exact match after normalize_answer().
ANSWER_SETS = {
    "location": list(LOCATIONS),
    "modality": [MODALITY_ANSWER[m] for m in MODALITY_KEYS],
    "count": [str(i) for i in range(MAX_COUNT + 1)],
    "size": list(SIZES),
    "choice": ["A", "B", "C", "D"],
}
# Chance of a uniform random guess from the closed set (held-out splits are balanced).
CHANCE = {q: 1.0 / len(a) for q, a in ANSWER_SETS.items()}

# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
QUESTIONS = {
    "modality": (
        "这是哪种影像检查？",
        "该图像采用的成像方式是什么？",
        "这张图像属于哪种检查方式？",
        "图中所示为何种医学影像？",
    ),
    "location": (
        "病灶位于图像的哪个位置？",
        "异常病变出现在图像哪个区域？",
        "图中病灶在什么位置？",
        "请指出病灶所在的象限。",
    ),
    "count": (
        "图中可见几个病灶？",
        "图像中有多少个病变？",
        "共发现几处异常？",
        "请数一下图中病灶的数量。",
    ),
    "size": (
        "病灶大小如何？",
        "该病变的大小是？",
        "图中病灶属于大、中、小哪一类？",
        "请判断病灶的大小。",
    ),
}
# Multiple choice (PMC-VQA-like): sub-topic -> question stems.
CHOICE_STEMS = {
    "modality": ("该图像的检查方式是？", "这幅图像属于哪种成像方式？"),
    "location": ("病灶位于图像的哪个位置？", "异常区域在哪里？"),
    "count": ("图中共有几个病灶？", "可见病灶的数量是？"),
    "size": ("病灶的大小是？", "该病变属于哪种大小？"),
    "kind": ("图中病灶的表现是？", "下列哪项最符合图中所见？"),
}
CHOICE_TOPICS = ("modality", "location", "count", "size", "kind")
# The reply is the chosen option's text, PMC-VQA's `Answer` column, scored by PMC-VQA's own rule
# (qilin_jax.infer.score_choice, "official": the most similar choice string must be the gold's).
# A letter-only reply ("请直接回答选项字母。" -> "B") stayed at chance in every demo run: the
# tiny model does not learn to look up the letter of an option within the CPU budget (see
# docs/experiments.md); LLaVA-Med-7B is at 24.7% on PMC-VQA with that prompt too.
CHOICE_SUFFIX = "请从以上选项中选出正确答案。"
NO_LESION = "未见病灶"
CHOICE_EXTRA = {"size": NO_LESION}  # the 4th option where the closed set has only 3

CAPTIONS_NORMAL = (
    "{mod}，未见明显异常。",
    "{mod}，各结构显示清晰，未见明显病灶。",
    "{mod}显示未见明显占位性病变。",
)
CAPTIONS_ONE = (
    "{mod}，{loc}可见一个{size}{kind}。",
    "{mod}显示{loc}一个{size}{kind}，边界清楚。",
    "{mod}，{loc}见{kind}一个，{mm}。",
)
CAPTIONS_MANY = (
    "{mod}，可见{n}{size}{kind}，分别位于{locs}。",
    "{mod}显示{n}{size}{kind}，位于{locs}，{mm}。",
    "{mod}，{locs}各见一个{size}{kind}，共{n}。",
)
COMPOSITE_PREFIX = ("同一病例的{k}幅图像。", "同一患者的{k}幅连续层面图像。")
COMPOSITE_SUFFIX = "各幅图像所见一致。"


def kind_name(case: dict) -> str:
    """Return the Chinese name of the case's lesion kind."""
    return KINDS[case["modality"]][case["kind"]]


def locations_text(locs: list[str]) -> str:
    """Return the Chinese enumeration of lesion locations, e.g. '左上和右下区域'."""
    if len(locs) == 1:
        return LOCATION_PHRASE[locs[0]]
    return "、".join(locs[:-1]) + "和" + locs[-1] + "区域"


def caption(case: dict, rng: np.random.Generator) -> str:
    """Return a Chinese stage-1 caption describing modality, findings, locations and sizes."""
    mod = MODALITY_DESC[case["modality"]][rng.integers(len(MODALITY_DESC[case["modality"]]))]
    n = case["count"]
    if n == 0:
        text = CAPTIONS_NORMAL[rng.integers(len(CAPTIONS_NORMAL))].format(mod=mod)
    else:
        fields = dict(
            mod=mod,
            kind=kind_name(case),
            size=SIZE_PHRASE[case["size"]],
            mm=SIZE_MM[case["size"]],
            loc=LOCATION_PHRASE[case["locations"][0]],
            locs=locations_text(case["locations"]),
            n=COUNT_CN[n],
        )
        pool = CAPTIONS_ONE if n == 1 else CAPTIONS_MANY
        text = pool[rng.integers(len(pool))].format(**fields)
    k = case.get("n_images", 1)
    if k > 1:
        text = COMPOSITE_PREFIX[rng.integers(len(COMPOSITE_PREFIX))].format(k=k) + text + COMPOSITE_SUFFIX
    return text


def answer(case: dict, qtype: str) -> str:
    """Return the canonical short answer of a non-choice question about the case."""
    if qtype == "modality":
        return MODALITY_ANSWER[case["modality"]]
    if qtype == "location":
        return case["locations"][0]
    if qtype == "count":
        return str(case["count"])
    if qtype == "size":
        return case["size"]
    raise ValueError(f"no direct answer for qtype {qtype!r}")


def applicable_qtypes(case: dict) -> list[str]:
    """Return the question types that have an unambiguous answer for the case."""
    out = ["modality", "count", "choice"]
    if case["count"] == 1:
        out.append("location")
    if case["count"] >= 1:
        out.append("size")
    return out


def _choice_options(
    case: dict, topic: str, rng: np.random.Generator, answer_pos: int | None = None
) -> tuple[list[str], str]:
    """Return (4 options in display order, correct option) for a multiple-choice topic."""
    if topic == "kind":
        correct = kind_name(case)
        pool = [k for k in ALL_KINDS if k != correct]
        others = [pool[i] for i in rng.permutation(len(pool))[:3]]
    elif topic == "size" and case["count"] == 0:
        correct = NO_LESION
        others = list(SIZES)
    else:
        correct = answer(case, topic)
        others = [a for a in ANSWER_SETS[topic] if a != correct]
        if topic in CHOICE_EXTRA:
            others.append(CHOICE_EXTRA[topic])
        others = [others[i] for i in rng.permutation(len(others))[:3]]
    options = [correct] + others
    options = [options[i] for i in rng.permutation(4)]
    if answer_pos is not None:  # move the correct option to a forced letter (balanced splits)
        options.remove(correct)
        options.insert(answer_pos, correct)
    return options, correct


def choice_topics(case: dict) -> list[str]:
    """Return the multiple-choice sub-topics that are unambiguous for the case."""
    out = ["modality", "count", "size"]
    if case["count"] == 1:
        out.append("location")
    if case["count"] >= 1:
        out.append("kind")
    return out


def question(
    case: dict, qtype: str, rng: np.random.Generator, topic: str | None = None, answer_pos: int | None = None
) -> dict:
    """Return {'question','answer','reply'} (+ 'choices','topic','stem','answer_text' for choice).

    `answer` is the gold label (a letter for choice questions), `reply` the assistant's turn in
    the training data (the correct option's text for choice questions, else the answer).
    For choice questions `topic` forces the sub-topic and `answer_pos` (0-3) the correct letter.
    """
    if qtype != "choice":
        qs = QUESTIONS[qtype]
        a = answer(case, qtype)
        return {"question": qs[rng.integers(len(qs))], "answer": a, "reply": a}
    topics = choice_topics(case)
    drawn = topics[rng.integers(len(topics))]
    if topic is None:
        topic = drawn
    elif topic not in topics:
        raise ValueError(f"choice topic {topic!r} is ambiguous for this case (allowed: {topics})")
    options, correct = _choice_options(case, topic, rng, answer_pos)
    letters = ANSWER_SETS["choice"]
    choices = [f"{letters[i]}:{o}" for i, o in enumerate(options)]
    stems = CHOICE_STEMS[topic]
    stem = stems[rng.integers(len(stems))]
    text = stem + "\n" + "\n".join(choices) + "\n" + CHOICE_SUFFIX
    return {
        "question": text,
        "answer": letters[options.index(correct)],
        "reply": correct,
        "choices": choices,
        "topic": topic,
        "stem": stem,
        "answer_text": correct,
    }


def sample_case(
    rng: np.random.Generator,
    modality: str | None = None,
    count: int | None = None,
    n_images: int = 1,
    size: str | None = None,
    location: str | None = None,
) -> dict:
    """Return a random case description (modality, count, kind, size, distinct quadrants).

    `location` (only with count 1) and `size` force those attributes, for balanced splits.
    """
    if modality is None:
        modality = MODALITY_KEYS[rng.integers(len(MODALITY_KEYS))]
    if count is None:
        count = int(rng.choice(4, p=[0.1, 0.5, 0.25, 0.15]))
    kinds = sorted(KINDS[modality])
    kind = kinds[rng.integers(len(kinds))]
    drawn_size = SIZES[rng.integers(len(SIZES))]
    size = drawn_size if size is None else size
    locs = [LOCATIONS[i] for i in sorted(rng.permutation(len(LOCATIONS))[:count])]
    if location is not None:
        if count != 1:
            raise ValueError("location can only be forced for single-lesion cases (count=1)")
        locs = [location]
    return {
        "modality": modality,
        "count": int(count),
        "kind": kind,
        "size": size,
        "locations": locs,
        "n_images": int(n_images),
    }


# ---------------------------------------------------------------------------------------------
# Answer normalisation (imported by evaluation)
# ---------------------------------------------------------------------------------------------
_SYNONYMS = {
    "location": {
        "左上": ("左上方", "左上区域", "左上象限", "图像左上方", "左上部"),
        "右上": ("右上方", "右上区域", "右上象限", "图像右上方", "右上部"),
        "左下": ("左下方", "左下区域", "左下象限", "图像左下方", "左下部"),
        "右下": ("右下方", "右下区域", "右下象限", "图像右下方", "右下部"),
    },
    "modality": {
        "CT": ("ct", "CT图像", "CT检查", "计算机断层扫描", "电子计算机断层扫描"),
        "X线": ("x线", "X光", "x光", "X线片", "X线平片", "X光片", "胸片", "xray", "x-ray"),
        "超声": ("B超", "b超", "超声检查", "超声图像", "彩超", "ultrasound", "us"),
        "磁共振": ("MRI", "mri", "MR", "mr", "核磁共振", "磁共振成像", "核磁"),
    },
    "count": {
        "0": ("零", "无", "没有", "0个", "未见", "未见病灶"),
        "1": ("一", "一个", "1个", "1处", "一处", "一枚"),
        "2": ("二", "两", "两个", "2个", "2处", "两处", "二个"),
        "3": ("三", "三个", "3个", "3处", "三处"),
    },
    "size": {
        "小": ("较小", "小的", "较小的", "小病灶"),
        "中": ("中等", "中等大小", "中等大小的", "中的"),
        "大": ("较大", "大的", "较大的", "大病灶"),
    },
}
_REVERSE = {q: {s.lower(): canon for canon, syns in d.items() for s in syns} for q, d in _SYNONYMS.items()}
_STRIP = " \t\r\n。．.，,、：:；;！!？?\"'“”‘’()（）[]【】"


def normalize_answer(text: str, qtype: str | None = None) -> str:
    """Return the canonical closed-set form of a generated answer (or the cleaned text)."""
    t = unicodedata.normalize("NFKC", str(text)).replace("</s>", "").strip().strip(_STRIP)
    if qtype is None:
        return t
    if qtype == "choice":
        return choice_letter(t) or t
    canon = ANSWER_SETS[qtype]
    if t in canon:
        return t
    rev = _REVERSE.get(qtype, {})
    if t.lower() in rev:
        return rev[t.lower()]
    # Longest known form contained in the text, e.g. "病灶位于左上方" -> "左上".
    forms = [(c, c) for c in canon] + [(s, c) for s, c in rev.items()]
    forms.sort(key=lambda fc: -len(fc[0]))
    low = t.lower()
    for form, c in forms:
        if len(form) >= 2 and form.lower() in low:
            return c
    for form, c in forms:
        if form.lower() in low:
            return c
    return t


def choice_letter(text: str, choices: list[str] | None = None) -> str | None:
    """Return the option letter in a generated answer ('B', 'B:...', '(B)', '选B'), else match option text."""
    t = unicodedata.normalize("NFKC", str(text)).replace("</s>", "").strip()
    m = re.match(r"^[\s(\[（【]*([ABCD])(?![A-Za-z])", t)
    if m:
        return m.group(1)
    m = re.search(r"(?:选项?|答案是?|answer is|option)\s*[:：]?\s*([ABCD])(?![A-Za-z])", t, flags=re.I)
    if m:
        return m.group(1).upper()
    if choices:
        for c in choices:
            letter, _, body = c.partition(":")
            if body and body in t:
                return letter.strip()
    return None


# ---------------------------------------------------------------------------------------------
# Text enumeration for the tokenizer corpus
# ---------------------------------------------------------------------------------------------
def all_template_strings() -> list[str]:
    """Return every fixed string the generator can emit (vocabulary, stems, answers)."""
    out: list[str] = []
    for m in MODALITY_KEYS:
        out += list(MODALITY_DESC[m]) + list(KINDS[m].values()) + [MODALITY_ANSWER[m]]
    for d in (LOCATION_PHRASE, SIZE_PHRASE, SIZE_MM, COUNT_CN):
        out += [str(v) for v in d.values()]
    for q in QUESTIONS.values():
        out += list(q)
    for q in CHOICE_STEMS.values():
        out += list(q)
    out += [CHOICE_SUFFIX, NO_LESION, COMPOSITE_SUFFIX]
    out += [p.format(k=k) for p in COMPOSITE_PREFIX for k in (2, 3, 4)]
    for a in ANSWER_SETS.values():
        out += list(a)
    return out


def iter_texts(seed: int = 0, n: int = 2000) -> Iterator[str]:
    """Yield n random cases' worth of generator text (captions, questions, answers)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.choice([1, 2, 3, 4], p=[0.85, 0.05, 0.05, 0.05]))
        case = sample_case(rng, n_images=k)
        yield caption(case, rng)
        for qt in applicable_qtypes(case):
            qa = question(case, qt, rng)
            yield qa["question"]
            yield qa["reply"]
