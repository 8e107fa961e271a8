"""Templates, token ids and label masks, checked token by token and against LLaVA's algorithm."""

import copy

import numpy as np
import pytest

from qilin_jax.data import (
    DataError,
    build_prompt,
    prepare_conversation,
    prompt_text,
    tokenize_conversation,
)
from qilin_jax.data import prompts as P
from tests.data_fixtures import conv

IGN = -100
K = 5  # image tokens in these tests (576 in the real model)

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

CONVS = [
    conv("<image>\n图中显示了什么？", "胸部X光片显示左肺有一个结节。"),
    conv("<image>\n图中显示了什么？", "胸部X光片显示左肺有一个结节。", "病变位于哪里？", "肿瘤位于肝脏。"),
    conv(
        "<image>\nWhat is shown in the image?",
        "A chest X-ray with a 12 mm nodule.",
        "Where is the lesion?",
        "In the left lung.",
        "Is it benign?",
        "Unclear.",
    ),
    conv("<image>\n请基于图中的信息，撰写一段相关的描述。", "MRI of the brain shows a lesion.\n患者出现发热和咳嗽。"),
    conv("Text only question 1?", "Answer 2."),
]


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------- LLaVA reference algorithm


def llava_tokenizer_image_token(prompt, tok):
    """LLaVA's tokenizer_image_token, image as one -200 (expanded to K below)."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    sep = [-200] * (offset + 1)
    seq = [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]
    for x in seq:
        ids.extend(x[offset:])
    return ids


def expand(ids, image_id):
    out = []
    for t in ids:
        out.extend([image_id] * K if t == -200 else [t])
    return out


def llava_preprocess_v1(conversation, tok, image_id):
    """LLaVA-1.5 preprocess_v1 (has_image=True): ids + labels by string splitting."""
    ids = llava_tokenizer_image_token(conversation, tok)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:1] = [IGN]
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tok))
        instr_len = len(llava_tokenizer_image_token(parts[0], tok)) - 2
        target[cur : cur + instr_len] = [IGN] * instr_len
        cur += round_len
    target[cur:] = [IGN] * (len(target) - cur)
    assert cur == len(ids), "LLaVA would report a tokenization mismatch"
    lab = []
    for t, y in zip(ids, target):
        lab.extend([IGN] * K if t == -200 else [y])
    return expand(ids, image_id), lab


def llava_preprocess_plain(human, caption, tok, image_id):
    prompt = "<image>" + caption + "\n"
    ids = llava_tokenizer_image_token(prompt, tok)
    n = len(llava_tokenizer_image_token("<image>", tok))
    target = [IGN] * n + ids[n:]
    lab = []
    for t, y in zip(ids, target):
        lab.extend([IGN] * K if t == -200 else [y])
    return expand(ids, image_id), lab


# ------------------------------------------------------------------------------- tests


def test_v1_token_by_token_chinese(tokenizer):
    tok = tokenizer
    img = len(tok)
    c = CONVS[1]
    ids, labels = tokenize_conversation(c, tok, "v1", image_tokens=K)
    assert prompt_text(c, "v1") == (
        SYS + " USER: <image>\n图中显示了什么？ ASSISTANT: 胸部X光片显示左肺有一个结节。</s>"
        "USER: 病变位于哪里？ ASSISTANT: 肿瘤位于肝脏。</s>"
    )
    sys_ids = enc(tok, SYS + " USER: ")
    q1 = enc(tok, "\n图中显示了什么？ ASSISTANT:")
    a1 = enc(tok, "胸部X光片显示左肺有一个结节。")
    q2 = enc(tok, "USER: 病变位于哪里？ ASSISTANT:")
    a2 = enc(tok, "肿瘤位于肝脏。")
    expect_ids = [1] + sys_ids + [img] * K + q1 + a1 + [2] + q2 + a2 + [2]
    expect_lab = [IGN] * (1 + len(sys_ids) + K + len(q1)) + a1 + [2] + [IGN] * len(q2) + a2 + [2]
    assert ids.tolist() == expect_ids
    assert labels.tolist() == expect_lab
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    # Hand-checkable: the supervised tokens are exactly the answers and their </s>.
    sup = [t for t, y in zip(ids.tolist(), labels.tolist()) if y != IGN]
    assert tok.decode(sup) == "胸部X光片显示左肺有一个结节。</s> 肿瘤位于肝脏。</s>"
    # The prompt side: "USER:" and the image/system are masked, the image sits after "USER: ".
    assert tok.convert_ids_to_tokens(sys_ids[-3:]) == ["▁USER", ":", "▁"]
    assert tok.convert_ids_to_tokens(q1[:2]) == ["▁", "<0x0A>"]


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_v1_equals_llava_preprocess_v1(tokenizer, i):
    tok, img = tokenizer, len(tokenizer)
    c = CONVS[i]
    ref_ids, ref_lab = llava_preprocess_v1(prompt_text(c, "v1"), tok, img)
    ids, labels = tokenize_conversation(c, tok, "v1", image_tokens=K)
    assert ids.tolist() == ref_ids
    assert labels.tolist() == ref_lab


def test_llava_v1_differs_only_in_system_prompt(tokenizer):
    c = CONVS[1]
    text = prompt_text(c, "llava_v1")
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert text.endswith(prompt_text(c, "v1")[len(SYS) :])
    ref_ids, ref_lab = llava_preprocess_v1(text, tokenizer, len(tokenizer))
    ids, labels = tokenize_conversation(c, tokenizer, "llava_v1", image_tokens=K)
    assert (ids.tolist(), labels.tolist()) == (ref_ids, ref_lab)


@pytest.mark.parametrize("i", [0, 3])
def test_plain_equals_llava_preprocess_plain(tokenizer, i):
    tok, img = tokenizer, len(tokenizer)
    c = CONVS[i]
    ids, labels = tokenize_conversation(c, tok, "plain", image_tokens=K)
    ref_ids, ref_lab = llava_preprocess_plain(c[0]["value"], c[1]["value"], tok, img)
    assert (ids.tolist(), labels.tolist()) == (ref_ids, ref_lab)
    cap = enc(tok, c[1]["value"] + "\n")
    # BOS, image, caption, "\n" (no </s>); only caption + "\n" supervised; human text dropped.
    assert ids.tolist() == [1] + [img] * K + cap
    assert labels.tolist() == [IGN] * (1 + K) + cap
    assert tok.convert_ids_to_tokens(cap[-1]) == "<0x0A>" and 2 not in ids.tolist()


def test_plain_rejects_multi_turn(tokenizer):
    with pytest.raises(DataError) as e:
        tokenize_conversation(CONVS[1], tokenizer, "plain", image_tokens=K)
    assert e.value.reason == "bad_roles"


def test_llava_llama_2(tokenizer):
    tok, img = tokenizer, len(tokenizer)
    c = CONVS[1]
    text = prompt_text(c, "llava_llama_2")
    assert text == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
        "understand the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n<</SYS>>\n\n<image>\n图中显示了什么？ [/INST] "
        "胸部X光片显示左肺有一个结节。 </s><s>[INST] 病变位于哪里？ [/INST] 肿瘤位于肝脏。 </s>"
    )
    ids, labels = tokenize_conversation(c, tok, "llava_llama_2", image_tokens=K)
    # Same ids as LLaVA's tokenizer_image_token on the whole prompt (<s> in the middle = BOS).
    assert ids.tolist() == expand(llava_tokenizer_image_token(text, tok), img)
    a1, a2 = enc(tok, "胸部X光片显示左肺有一个结节。 "), enc(tok, "肿瘤位于肝脏。 ")
    sup = [y for y in labels.tolist() if y != IGN]
    assert sup == a1 + [2] + a2 + [2]


def test_image_token_id_default_and_override(tokenizer):
    c = CONVS[0]
    ids, _ = tokenize_conversation(c, tokenizer, "v1", image_tokens=K)
    assert (ids == len(tokenizer)).sum() == K
    ids, _ = tokenize_conversation(c, tokenizer, "v1", image_tokens=K, image_token_id=-200)
    assert (ids == -200).sum() == K
    tok2 = copy.deepcopy(tokenizer)
    tok2.add_tokens(["<image>"], special_tokens=True)
    image_id = tok2.convert_tokens_to_ids("<image>")
    ids2, _ = tokenize_conversation(c, tok2, "v1", image_tokens=K)
    assert (ids2 == image_id).sum() == K
    assert np.array_equal(np.where(ids2 == image_id, -1, ids2), np.where(ids == -200, -1, ids))


def test_truncation(tokenizer):
    c = CONVS[1]
    ids, labels = tokenize_conversation(c, tokenizer, "v1", image_tokens=K)
    n = len(ids)
    start = int(np.argmax(ids == len(tokenizer)))
    t_ids, t_lab = tokenize_conversation(c, tokenizer, "v1", image_tokens=K, max_length=n - 3)
    assert t_ids.tolist() == ids[: n - 3].tolist() and t_lab.tolist() == labels[: n - 3].tolist()
    # A cut inside (or before) the image placeholder is refused, never made.
    for cut in (start + 2, start):
        with pytest.raises(DataError) as e:
            tokenize_conversation(c, tokenizer, "v1", image_tokens=K, max_length=cut)
        assert e.value.reason == "image_cut"
    # A cut right after the image leaves only prompt tokens: nothing to learn.
    first_sup = int(np.argmax(labels != IGN))
    with pytest.raises(DataError) as e:
        tokenize_conversation(c, tokenizer, "v1", image_tokens=K, max_length=first_sup)
    assert e.value.reason == "no_supervised_tokens"
    ok, lab = tokenize_conversation(c, tokenizer, "v1", image_tokens=K, max_length=first_sup + 1)
    assert (lab != IGN).sum() == 1


def test_build_prompt_for_generation(tokenizer):
    tok, img = tokenizer, len(tokenizer)
    c = CONVS[1]
    p1 = build_prompt(c[:1], tok, "v1", image_tokens=K)
    assert tok.convert_ids_to_tokens(p1[-3:].tolist())[-1] == ":"
    assert prompt_text(c[:1], "v1", generation=True).endswith("图中显示了什么？ ASSISTANT:")
    assert p1.tolist() == expand(llava_tokenizer_image_token(prompt_text(c[:1], "v1", True), tok), img)
    # With history: the prompt is the training ids up to (and including) "ASSISTANT:".
    ids, labels = tokenize_conversation(c, tok, "v1", image_tokens=K)
    p2 = build_prompt(c[:3] + [{"from": "gpt", "value": None}], tok, "v1", image_tokens=K)
    a2_start = len(ids) - len(enc(tok, "肿瘤位于肝脏。")) - 1
    assert p2.tolist() == ids[:a2_start].tolist()
    assert build_prompt(c[:1], tok, "plain", image_tokens=K).tolist() == [1] + [img] * K
    with pytest.raises(DataError):
        build_prompt(c[:2], tok, "v1", image_tokens=K)  # ends with an answer


@pytest.mark.parametrize(
    "turns,reason",
    [
        ([], "empty_conversation"),
        ("not a list", "bad_record"),
        ([{"from": "human", "value": "q"}], "no_assistant_turn"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "bad_roles"),
        ([{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], "bad_record"),
        ([{"role": "user", "content": "q"}], "bad_record"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "bad_record"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "see <image>"}], "image_in_answer"),
        ([{"from": "human", "value": "q\udcff"}, {"from": "gpt", "value": "a"}], "not_utf8"),
    ],
)
def test_bad_conversations(tokenizer, turns, reason):
    with pytest.raises(DataError) as e:
        tokenize_conversation(turns, tokenizer, "v1", image_tokens=K)
    assert e.value.reason == reason


def test_leading_gpt_and_trailing_human_are_dropped(tokenizer):
    c = [{"from": "gpt", "value": "hello"}] + CONVS[0] + [{"from": "human", "value": "more?"}]
    a = tokenize_conversation(c, tokenizer, "v1", image_tokens=K)
    b = tokenize_conversation(CONVS[0], tokenizer, "v1", image_tokens=K)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def test_prepare_conversation_image_tags():
    c = conv("看这个 <image> 和 <image>", "好的。")
    out = prepare_conversation(c, 2, composite=True)
    assert out[0]["value"] == "<image>\n看这个  和"
    out = prepare_conversation(c, 2, composite=False)
    assert out[0]["value"] == "<image>\n<image>\n看这个  和"
    out = prepare_conversation(conv("问题？\n<image>", "答"), 1, move_image_to_front=False)
    assert out[0]["value"] == "问题？\n<image>"
    assert prepare_conversation(conv("问题？\n<image>", "答"), 1)[0]["value"] == "<image>\n问题？"
    assert prepare_conversation(conv("<image>", "答"), 3)[0]["value"] == "<image>"  # 1 tag, composite
    for c, n, kw, reason in [
        (conv("<image> q", "a"), 0, {}, "image_count_mismatch"),
        (conv("q", "a"), 1, {}, "image_count_mismatch"),
        (conv("<image><image> q", "a"), 3, {}, "image_count_mismatch"),
        (conv("<image> q", "a"), 2, {"composite": False}, "image_count_mismatch"),
        (conv("<image> q", "a"), 5, {}, "too_many_images"),
    ]:
        with pytest.raises(DataError) as e:
            prepare_conversation(c, n, **kw)
        assert e.value.reason == reason


def test_paper_prompts():
    assert len(P.ALIGNMENT_PROMPTS_ZH) == len(P.ALIGNMENT_PROMPTS_EN) == 22
    assert len(P.INSTRUCTION_PROMPTS_ZH) == len(P.INSTRUCTION_PROMPTS_EN) == 7
    for p in P.ALIGNMENT_PROMPTS_ZH + P.ALIGNMENT_PROMPTS_EN:
        assert p.count("<image>") == 1
    for p in P.INSTRUCTION_PROMPTS_ZH + P.INSTRUCTION_PROMPTS_EN:
        assert p.count("<image>") == 1 and p.count("<question>") == 1
    assert P.ALIGNMENT_PROMPTS_ZH[0] == "请基于图中的信息，撰写一段相关的描述。 \n<image>"
    draws = [P.choose_prompt(P.ALIGNMENT_PROMPTS_ZH, 0, i) for i in range(200)]
    assert draws == [P.choose_prompt(P.ALIGNMENT_PROMPTS_ZH, 0, i) for i in range(200)]
    assert len(set(draws)) == 22  # all used
    assert draws != [P.choose_prompt(P.ALIGNMENT_PROMPTS_ZH, 1, i) for i in range(200)]
    c = conv("<image>\n原始问题", "一段描述。")
    out = P.apply_prompt(c, "alignment", seed=0, key=3)
    assert out[0]["value"] == P.choose_prompt(P.ALIGNMENT_PROMPTS_ZH, 0, 3) and out[1] == c[1]
    out = P.apply_prompt(c, "instruction", seed=0, key=3)
    tpl = P.choose_prompt(P.INSTRUCTION_PROMPTS_ZH, 0, 3)
    assert out[0]["value"] == tpl.replace("<question>", "原始问题")
    assert P.apply_prompt(c, "none", seed=0, key=3) == c
