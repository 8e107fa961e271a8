"""The paper's prompt templates (Appendix A.1) as data, and the seeded per-sample choice.

Chinese strings are the ones used for training (the paper's text, with its "\\n" as a newline
and its spacing kept). The English lists are the paper's reference translations, with three
PDF-extraction artefacts removed (a stray leading '"' twice and a stray 'E').
"""

from __future__ import annotations

import random

IMAGE_TAG = "<image>"
QUESTION_TAG = "<question>"

# 22 prompts for stage 1, medical vision-language feature alignment (image captioning).
ALIGNMENT_PROMPTS_ZH = (
    "请基于图中的信息，撰写一段相关的描述。 \n<image>",
    "根据图示内容，写一段相关的文本。 \n<image>",
    "<image>\n 根据图中可见，提供一段相关的叙述。",
    "<image>\n 结合图中的细节，写下一段相关的文字。",
    "描述一下图示中的场景，并附上相关的文本。 \n<image>",
    "<image>\n 根据图示，写下一段与其中内容相关的文字。",
    "<image>\n 请根据图中细节，撰写一段相关的描述。",
    "图示呈现了什么，写下一段相关的文本。 \n<image>",
    "基于图中的内容，提供一段相关的叙述。 \n<image>",
    "<image>\n 结合图示，给出一段与其中内容相关的文字描述。",
    "阅读并理解下图，然后撰写一段与图中内容相关的文本。 \n<image>",
    "<image>\n 图中的信息揭示了什么？请撰写一段相关的文本进行解释。",
    "<image>\n 分析图中的信息并提供一段相关的文字描述。",
    "根据图中的内容撰写一段相关的文本。 \n<image>",
    "请根据图中的细节给出一段相关文本。 \n<image>",
    "<image>\n 从图中获取关键信息，并撰写一段相关的文本。",
    "<image>\n 图中给出了怎样的信息，请用一段相关的文字描述出来。",
    "根据图中的元素和组成部分，写一段相关的文本。 \n<image>",
    "请根据图中所呈现的内容写一段相关文字。 \n<image>",
    "<image>\n 根据图中的信息，撰写一段描述性文本。",
    "<image>\n 图中的内容暗示了什么？请撰写一段相关的文字。",
    "图中的内容传达了怎样的信息？请写一段相关的描述性文本。 \n<image>",
)

ALIGNMENT_PROMPTS_EN = (
    "Based on the information in the image, please write a related description. \n<image>",
    "Based on the content of the illustration, write a related text. \n<image>",
    "<image>\n Based on what is seen in the image, provide a related description.",
    "<image>\n Based on the details in the image, write a related passage.",
    "Describe the scene in the illustration and provide related text.\n<image>",
    "<image>\n Based on the illustration, write a passage related to its content.",
    "<image>\n Please write a description based on the details in the image.",
    "What does the illustration show? Write a related passage.\n<image>",
    "Based on the content in the image, provide a related description.\n<image>",
    "<image>\n Based on the illustration, provide a textual description related to its content.",
    "Read and understand the following image, then write a passage related to the content in the image.\n<image>",
    "<image>\n What does the information in the image reveal? Please write a related passage to explain.",
    "<image>\n Analyze the information in the image and provide a related textual description.",
    "Write a passage based on the content in the image.\n<image>",
    "Please provide a passage based on the details in the image.\n<image>",
    "<image>\n Extract key information from the image and write a related passage.",
    "<image>\n What information is provided in the image? Please describe it in a related passage.",
    "Based on the elements and components in the image, write a related passage.\n<image>",
    "Please write a passage based on the content presented in the image. \n<image>",
    "<image>\n Based on the information in the image, write a descriptive passage.",
    "<image>\n What does the content in the image imply? Please write a related passage.",
    "What message does the content in the image convey? Please write a related descriptive passage.\n<image>",
)

# 7 prompts for stage 2, medical instruction tuning; <question> is replaced by the question.
INSTRUCTION_PROMPTS_ZH = (
    "<image>\n<question>\n请尽量简洁地回答。",
    "<image>\n<question>\n简洁回复即可。",
    "<image>\n<question>\n请根据图中内容简洁作答。",
    "<image>\n<question>\n请直接说出正确答案。",
    "<image>\n<question>\n请直接作答。",
    "<question>\n请根据图中内容尽量简洁作答。 \n<image>",
    "<question>\n请尽可能简洁地回复。 \n<image>",
)

INSTRUCTION_PROMPTS_EN = (
    "<image>\n<question>\nPlease answer as concisely as possible.",
    "<image>\n<question>\nA concise reply will suffice.",
    "<image>\n<question>\nPlease answer concisely based on the content in the image.",
    "<image>\n<question>\nPlease state the correct answer directly.",
    "<image>\n<question>\nPlease answer directly.",
    "<question>\nPlease answer as concisely as possible based on the content in the image.\n<image>",
    "<question>\nPlease reply as concisely as possible.\n<image>",
)

# PMC-VQA multiple-choice suffix (REFERENCE.md: The data).
MC_SUFFIX = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接回答选项字母。",
}

PROMPT_MODES = ("none", "alignment", "instruction")


def prompt_set(mode: str, language: str = "zh") -> tuple[str, ...]:
    """Returns the paper's prompt list for `mode` (alignment|instruction) and language (zh|en)."""
    table = {
        ("alignment", "zh"): ALIGNMENT_PROMPTS_ZH,
        ("alignment", "en"): ALIGNMENT_PROMPTS_EN,
        ("instruction", "zh"): INSTRUCTION_PROMPTS_ZH,
        ("instruction", "en"): INSTRUCTION_PROMPTS_EN,
    }
    if (mode, language) not in table:
        raise ValueError(
            f"no prompt set for mode={mode!r} language={language!r}; modes: alignment|instruction, languages: zh|en"
        )
    return table[(mode, language)]


def choose_prompt(prompts: tuple[str, ...], seed: int, key: int | str) -> str:
    """Returns the prompt for one sample: a deterministic draw from (seed, sample key)."""
    # random.Random seeded with a str hashes it with SHA-512: stable across processes and runs.
    return prompts[random.Random(f"{seed}:{key}").randrange(len(prompts))]


def apply_prompt(
    conversations: list[dict],
    mode: str,
    *,
    seed: int,
    key: int | str,
    language: str = "zh",
) -> list[dict]:
    """Returns a copy of the conversation with its first human turn rewritten by a paper prompt.

    alignment: the first human turn becomes the drawn prompt (its <image> tag, nothing else;
    the gpt turn is the caption). instruction: the drawn template with <question> replaced by
    the first human turn's text without its <image> tags. none: unchanged.
    """
    if mode == "none":
        return conversations
    prompts = prompt_set(mode, language)
    prompt = choose_prompt(prompts, seed, key)
    out = [dict(t) for t in conversations]
    for turn in out:
        if turn.get("from") != "human":
            continue
        value = turn.get("value") or ""
        n_tags = max(1, value.count(IMAGE_TAG))
        tags = "\n".join([IMAGE_TAG] * n_tags)
        if mode == "alignment":
            turn["value"] = prompt.replace(IMAGE_TAG, tags)
        else:
            question = value.replace(IMAGE_TAG, "").strip()
            if value.count(IMAGE_TAG) == 0:
                # Text-only turn: keep the template's wording but no image tag.
                turn["value"] = prompt.replace(IMAGE_TAG, "").replace(QUESTION_TAG, question).strip()
            else:
                turn["value"] = prompt.replace(IMAGE_TAG, tags).replace(QUESTION_TAG, question)
        break
    return out
