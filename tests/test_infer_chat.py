"""Chat through stdin/stdout with a tiny random model: PNG and DICOM images, multi-turn prompts,
commands, one-shot form; the streamed answer equals batched KV-cache generation."""

import io

import numpy as np
import pydicom.data
import pytest
from PIL import Image

from qilin_jax.data.conversation import prompt_text
from qilin_jax.infer.chat import ChatSession, run_chat
from qilin_jax.infer.common import load_pixels, prompt_ids
from qilin_jax.infer.config import ChatConfig
from qilin_jax.infer.generate import generate

CT = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("chat") / "xray.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8), "L").save(p)  # not square
    return str(p)


def _reference_answer(model, tokenizer, turns, image, n):
    """The answer batched greedy generation gives for these turns (what streaming must equal)."""
    ids = prompt_ids(model, tokenizer, turns)
    px = load_pixels(model, [image], [image], "pad") if image else None
    toks = generate(model, ids[None], px, max_new_tokens=n, eos_token_id=tokenizer.eos_token_id)[0]
    toks = [int(t) for t in toks]
    if tokenizer.eos_token_id in toks:
        toks = toks[: toks.index(tokenizer.eos_token_id)]
    return tokenizer.decode(toks, skip_special_tokens=True).split("USER:")[0].strip()


def test_interactive_session_png_then_dicom(tiny_model, tokenizer, png):
    stdin = io.StringIO(
        "这是什么检查？\n病灶在哪里？\n/reset\n\n/image " + CT + "\n描述这张CT。\n"
        "/image /no/such/file.png\n/help\n/exit\n"
    )
    stdout = io.StringIO()
    cfg = ChatConfig(image=png, max_new_tokens=6)
    history = run_chat(tiny_model, tokenizer, cfg, stdin=stdin, stdout=stdout)
    out = stdout.getvalue()
    lines = out.splitlines()
    assert lines[0].startswith("Qilin-Med-VL chat. image: " + png)
    answers = [ln[len("USER: ASSISTANT: ") :] for ln in lines if ln.startswith("USER: ASSISTANT: ")]
    assert len(answers) == 3
    assert "(conversation reset)" in out
    assert f"(image loaded: {CT}; new conversation)" in out
    assert "error: image file not found: /no/such/file.png" in out
    assert "/image PATH" in out  # help text
    # The session after /image holds one round about the DICOM image, answered as streamed.
    assert history[0] == {"from": "human", "value": "<image>\n描述这张CT。"}
    assert history[1] == {"from": "gpt", "value": answers[2]}
    assert answers[2] == _reference_answer(tiny_model, tokenizer, history[:1], CT, 6)


def test_multi_turn_prompt_and_streaming_equal_generate(tiny_model, tokenizer, png):
    s = ChatSession(tiny_model, tokenizer, ChatConfig(image=png, max_new_tokens=6))
    pieces = []
    a1 = s.ask("这是什么检查？", pieces.append)
    assert "".join(pieces).strip() == a1
    assert a1 == _reference_answer(
        tiny_model, tokenizer, [{"from": "human", "value": "<image>\n这是什么检查？"}], png, 6
    )
    a2 = s.ask("病灶在哪里？")
    # The second prompt re-prefills the whole conversation in the v1 template.
    text = prompt_text(s.history[:3], "v1", generation=True)
    assert text.startswith("A chat between a curious user")
    assert f"USER: <image>\n这是什么检查？ ASSISTANT: {a1}</s>USER: 病灶在哪里？ ASSISTANT:" in text
    assert a2 == _reference_answer(tiny_model, tokenizer, s.history[:3], png, 6)
    s.reset()
    assert s.history == [] and s.pixels is not None


def test_context_limit_drops_oldest_round_keeps_image(tiny_model, tokenizer, png):
    s = ChatSession(tiny_model, tokenizer, ChatConfig(image=png, max_new_tokens=4))
    s.ask("第一个问题")
    s.ask("第二个问题")
    last_round = [
        {"from": "human", "value": "<image>\n第二个问题"},
        {"from": "gpt", "value": s.history[3]["value"]},
        {"from": "human", "value": "第三个问题"},
    ]
    one_round = len(prompt_ids(tiny_model, tokenizer, last_round))
    s.cfg.max_context = one_round + 2  # room for the last round and the new question only
    s.ask("第三个问题")
    assert [t["value"] for t in s.history if t["from"] == "human"] == ["<image>\n第二个问题", "第三个问题"]


def test_one_shot_prints_only_the_answer(tiny_model, tokenizer, png):
    for stream in (True, False):
        stdout = io.StringIO()
        hist = run_chat(
            tiny_model,
            tokenizer,
            ChatConfig(image=CT, question="这是什么检查？", max_new_tokens=5, stream=stream),
            stdin=io.StringIO(""),
            stdout=stdout,
        )
        assert stdout.getvalue() == hist[1]["value"] + "\n"


def test_bad_image_names_the_file(tiny_model, tokenizer):
    from qilin_jax.data.errors import DataError

    with pytest.raises(DataError, match="missing.png"):
        ChatSession(tiny_model, tokenizer, ChatConfig(image="missing.png"))
