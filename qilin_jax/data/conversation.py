"""Conversation templates and tokenization with label masks, as the release trains.

Labels are built by tokenizing each segment of the prompt separately and concatenating, never
by splitting a tokenized string (LLaVA's approach, which drops samples with "tokenization
mismatch" on some tokenizers). The segments are chosen so the concatenation equals LLaVA's
`tokenizer_image_token(full_prompt)` with the legacy LLaMA tokenizer the release trained with:

* A segment that starts the prompt, or follows BOS, `</s>` or an image placeholder, is
  tokenized on its own, so it gets SentencePiece's dummy-prefix "▁" exactly as LLaVA's
  per-chunk tokenization (and the legacy tokenizer after a special token) gives it. A
  non-legacy tokenizer applied to the whole string would *not* put "▁" after `</s>`; we keep
  the release's tokens regardless of the tokenizer's `legacy` flag (deliberate).
* An answer follows "ASSISTANT:" after one space. It is tokenized behind an anchor ("\\n")
  and the anchor's tokens are dropped, so it gets exactly its in-context tokens ("▁answer").
  This is the only split inside a text run, and it falls on a space, where SentencePiece
  never merges across, so no token differs from whole-string tokenization.

`llava_llama_2` masks every instruction token; LLaVA's own preprocess_llama_2 leaves the last
token of each "[/INST]" supervised by an off-by-one, which we do not copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qilin_jax.data.errors import DataError

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLES = ("human", "gpt")

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Template:
    """A conversation format: `style` is plain | two (Vicuna v1) | llama_2."""

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain"),
    "v1": Template("v1", "two", VICUNA_V1_SYSTEM),
    "llava_v1": Template("llava_v1", "two", LLAVA_V1_SYSTEM),
    "llava_llama_2": Template("llava_llama_2", "llama_2", LLAVA_LLAMA_2_SYSTEM),
}


def get_template(name: str) -> Template:
    """Returns the template called `name`, or raises with the list of known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}") from None


# --------------------------------------------------------------------------------------------
# Validation and image-tag normalisation


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError("bad_record", f"{where}: 'value' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            "not_utf8",
            f"{where}: text is not valid UTF-8 (undecodable bytes; if the whole file is in "
            "another encoding such as GBK, convert it: iconv -f GBK -t UTF-8)",
        ) from None
    return value


def validate_conversation(conversations: Any, *, for_generation: bool = False) -> list[dict]:
    """Returns the checked turns (human, gpt, human, ...) or raises DataError with the reason.

    Like LLaVA, a leading gpt turn is dropped. For training a trailing unanswered human turn is
    dropped; for generation the conversation must end with the human turn to answer.
    """
    if not isinstance(conversations, (list, tuple)):
        raise DataError("bad_record", f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    if len(conversations) == 0:
        raise DataError("empty_conversation", "'conversations' is empty")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            found = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise DataError(
                "bad_record",
                f"turn {i}: expected a dict with 'from' and 'value', found {found}",
            )
        role = turn["from"]
        if role not in ROLES:
            raise DataError("bad_record", f"turn {i}: 'from' must be 'human' or 'gpt', got {role!r}")
        value = turn["value"]
        if value is None and for_generation and role == "gpt" and i == len(conversations) - 1:
            continue  # an open assistant slot at the end of a generation prompt
        turns.append({"from": role, "value": _check_text(value, f"turn {i}")})
    if turns and turns[0]["from"] == "gpt":
        turns = turns[1:]
    if not turns:
        raise DataError("empty_conversation", "no human turn in 'conversations'")
    for i, turn in enumerate(turns):
        if turn["from"] != ROLES[i % 2]:
            raise DataError(
                "bad_roles",
                f"turn {i} is from {turn['from']!r} but turns must alternate human/gpt",
            )
        if turn["from"] == "gpt" and IMAGE_TAG in turn["value"]:
            raise DataError("image_in_answer", f"turn {i}: <image> tag in an assistant answer")
    if for_generation:
        if turns[-1]["from"] != "human":
            raise DataError("bad_roles", "a generation prompt must end with the human turn to answer")
    else:
        if len(turns) % 2 == 1:
            turns = turns[:-1]
        if not turns:
            raise DataError("no_assistant_turn", "the conversation has no gpt answer")
    return turns


def count_image_tags(conversations: Sequence[dict]) -> int:
    """Returns the number of <image> tags in the human turns."""
    return sum(
        t["value"].count(IMAGE_TAG)
        for t in conversations
        if t.get("from") == "human" and isinstance(t.get("value"), str)
    )


def prepare_conversation(
    conversations: list[dict],
    n_images: int,
    *,
    composite: bool = True,
    composite_max: int = 4,
    move_image_to_front: bool = True,
) -> list[dict]:
    """Returns the turns with <image> tags checked against `n_images` and placed as trained.

    Composite on: 1 or n_images tags collapse to one tag (at the first). Composite off: the
    tag count must equal n_images. move_image_to_front (LLaVA preprocess_multimodal): each
    turn with tags becomes "<image>\\n" + its text stripped of the tags.
    """
    if n_images > composite_max:
        raise DataError("too_many_images", f"{n_images} images > composite_max={composite_max} (dropped)")
    tags = count_image_tags(conversations)
    if n_images == 0 and tags:
        raise DataError("image_count_mismatch", f"{tags} <image> tag(s) in the text but the record has no image")
    if n_images and not tags:
        raise DataError("image_count_mismatch", f"{n_images} image(s) but no <image> tag in the human turns")
    expected_tags = 1 if (composite and n_images > 1) else n_images
    if n_images and tags != n_images and not (composite and tags == 1):
        raise DataError(
            "image_count_mismatch",
            f"{tags} <image> tag(s) for {n_images} image(s)"
            + (" (composite on: expected 1 or one per image)" if composite else ""),
        )
    out = [dict(t) for t in conversations]
    if tags > expected_tags:
        # Keep the first tag only: the composite replaces all images at that spot.
        seen = False
        for t in out:
            if t["from"] != "human" or IMAGE_TAG not in t["value"]:
                continue
            parts = t["value"].split(IMAGE_TAG)
            if seen:
                t["value"] = "".join(parts)
            else:
                t["value"] = parts[0] + IMAGE_TAG + "".join(parts[1:])
                seen = True
    if move_image_to_front:
        for t in out:
            k = t["value"].count(IMAGE_TAG)
            if t["from"] == "human" and k:
                rest = t["value"].replace(IMAGE_TAG, "").strip()
                t["value"] = ("\n".join([IMAGE_TAG] * k) + "\n" + rest).strip()
    return out


# --------------------------------------------------------------------------------------------
# Segments


def _segments(turns: list[dict], template: Template, generation: bool) -> list[tuple]:
    """Returns [(kind, text, supervised)] with kind bos | eos | text; texts joined = the prompt."""
    segs: list[tuple] = [("bos", None, False)]
    pairs = [
        (turns[i]["value"], turns[i + 1]["value"] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)
    ]
    if template.style == "plain":
        if len(pairs) != 1:
            raise DataError(
                "bad_roles",
                f"the plain template takes exactly one human/gpt pair, got {len(pairs)}",
            )
        question, caption = pairs[0]
        tags = question.count(IMAGE_TAG)
        if tags:
            segs.append(("text", IMAGE_TAG * tags, False))
        if not generation:
            segs.append(("text", caption + "\n", True))  # conv_llava_plain sep = "\n"
        return segs
    user, assistant = template.roles
    if template.style == "two":
        for i, (q, a) in enumerate(pairs):
            prefix = template.system + " " if i == 0 else ""
            segs.append(("text", f"{prefix}{user}: {q} {assistant}:", False))
            if a is None:
                break
            segs.append(("text", " " + a, True))
            segs.append(("eos", None, True))
        return segs
    if template.style == "llama_2":
        for i, (q, a) in enumerate(pairs):
            if i == 0:
                sys = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n" if template.system else ""
                segs.append(("text", f"[INST] {sys}{q} [/INST]", False))
            else:
                segs.append(("bos", None, False))  # the "<s>" that opens each later round
                segs.append(("text", f"[INST] {q} [/INST]", False))
            if a is None:
                break
            segs.append(("text", f" {a} ", True))
            segs.append(("eos", None, True))
        return segs
    raise ValueError(f"unknown template style {template.style!r}")


# --------------------------------------------------------------------------------------------
# Tokenizer helpers


class _TokInfo:
    """Per-tokenizer constants and a fast encode function (cached by tokenizer identity)."""

    ANCHOR = "\n"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.encode = lambda s: backend.encode(s, add_special_tokens=False).ids
        else:
            self.encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no eos_token_id; answers end with </s>")
        vocab = tokenizer.get_vocab()
        self.default_image_id = vocab[IMAGE_TAG] if IMAGE_TAG in vocab else len(tokenizer)
        self.anchor_ids = self.encode(self.ANCHOR)

    def encode_continuation(self, text: str) -> list[int]:
        """Returns the tokens `text` gets in the middle of a prompt (it follows a non-space)."""
        full = self.encode(self.ANCHOR + text)
        n = len(self.anchor_ids)
        if full[:n] == self.anchor_ids:
            return full[n:]
        return self.encode(text)  # the anchor merged with the text: fall back


_TOK_CACHE: dict[int, _TokInfo] = {}


def _tok_info(tokenizer) -> _TokInfo:
    info = _TOK_CACHE.get(id(tokenizer))
    if info is None or info.tokenizer is not tokenizer:
        info = _TokInfo(tokenizer)
        if len(_TOK_CACHE) > 16:
            _TOK_CACHE.clear()
        _TOK_CACHE[id(tokenizer)] = info
    return info


def default_image_token_id(tokenizer) -> int:
    """Returns the id of "<image>" if the tokenizer has it, else len(tokenizer) (HF llava: 32000)."""
    return _tok_info(tokenizer).default_image_id


def _encode_segments(segs, info: _TokInfo, image_tokens: int, image_token_id: int):
    ids: list[int] = []
    labels: list[int] = []
    image_spans: list[tuple[int, int]] = []
    prev_text = False  # whether the last emitted item was text (so the next is a continuation)
    for kind, text, sup in segs:
        if kind == "bos":
            if info.bos is not None:
                ids.append(info.bos)
                labels.append(IGNORE_INDEX)
            prev_text = False
        elif kind == "eos":
            ids.append(info.eos)
            labels.append(info.eos if sup else IGNORE_INDEX)
            prev_text = False
        else:
            for ci, chunk in enumerate(text.split(IMAGE_TAG)):
                if ci > 0:
                    image_spans.append((len(ids), len(ids) + image_tokens))
                    ids.extend([image_token_id] * image_tokens)
                    labels.extend([IGNORE_INDEX] * image_tokens)
                    prev_text = False
                if not chunk:
                    continue
                if prev_text:
                    # Only answers continue a text run, and they start with the separator space.
                    assert chunk[0] == " ", chunk
                    toks = info.encode_continuation(chunk)
                else:
                    toks = info.encode(chunk)
                ids.extend(toks)
                labels.extend(toks if sup else [IGNORE_INDEX] * len(toks))
                prev_text = True
    return ids, labels, image_spans


def tokenize_conversation(
    conversations: Sequence[dict],
    tokenizer,
    template: str = "v1",
    image_tokens: int = 576,
    image_token_id: int | None = None,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (input_ids, labels), 1-D int32 arrays: <image> expanded, -100 on unsupervised.

    max_length counts tokens with images expanded; truncation never cuts an image placeholder
    (DataError "image_cut") and must leave a supervised token (DataError "no_supervised_tokens").
    """
    tpl = get_template(template)
    info = _tok_info(tokenizer)
    if image_token_id is None:
        image_token_id = info.default_image_id
    turns = validate_conversation(conversations)
    segs = _segments(turns, tpl, generation=False)
    ids, labels, spans = _encode_segments(segs, info, image_tokens, image_token_id)
    if max_length is not None and len(ids) > max_length:
        for start, end in spans:
            if end > max_length:
                raise DataError(
                    "image_cut",
                    f"{len(ids)} tokens > max_length={max_length} and the cut would fall in or "
                    f"before the image at positions {start}..{end - 1}",
                )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError(
            "no_supervised_tokens",
            "no supervised token" + (f" within max_length={max_length}" if max_length is not None else ""),
        )
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


# First questions of different kinds (image first, CJK, Latin, digit, punctuation, space): the
# tokens all of their prompts share are the template's preamble.
_PREAMBLE_PROBES = (IMAGE_TAG + "\n?", "?", "甲", "A", "a", "1", "(", "\n", " x", IMAGE_TAG)


def template_preamble(
    tokenizer, template: str = "v1", image_tokens: int = 1, image_token_id: int | None = None
) -> np.ndarray:
    """Returns the int32 ids every tokenized conversation of `template` starts with: BOS, the
    system prompt and the first role tag, as far as no first question can change them (the
    longest common prefix of probe conversations; no image token, no label). Training shares
    it between the rows of a batch (`train.shared_prefix`); "plain" has only BOS."""
    prefix = None
    for q in _PREAMBLE_PROBES:
        ids, labels = tokenize_conversation(
            [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}],
            tokenizer,
            template,
            image_tokens,
            image_token_id,
        )
        n = int(np.argmax(labels != IGNORE_INDEX))  # the first label: the answer
        ids = ids[:n]
        if prefix is None:
            prefix = ids
        else:
            k = min(len(prefix), len(ids))
            diff = np.nonzero(prefix[:k] != ids[:k])[0]
            prefix = prefix[: diff[0] if diff.size else k]
    if image_token_id is None:
        image_token_id = default_image_token_id(tokenizer)
    img = np.nonzero(prefix == image_token_id)[0]
    return prefix[: img[0]] if img.size else prefix


def build_prompt(
    conversations: Sequence[dict],
    tokenizer,
    template: str = "v1",
    image_tokens: int = 576,
    image_token_id: int | None = None,
) -> np.ndarray:
    """Returns the int32 ids of a generation prompt (ends in "ASSISTANT:" for v1), images expanded.

    `conversations` ends with the human turn to answer (optionally followed by a gpt turn
    whose value is None); earlier pairs are the chat history.
    """
    tpl = get_template(template)
    info = _tok_info(tokenizer)
    if image_token_id is None:
        image_token_id = info.default_image_id
    turns = validate_conversation(conversations, for_generation=True)
    segs = _segments(turns, tpl, generation=True)
    ids, _, _ = _encode_segments(segs, info, image_tokens, image_token_id)
    return np.asarray(ids, np.int32)


def prompt_text(conversations: Sequence[dict], template: str = "v1", generation: bool = False) -> str:
    """Returns the full prompt string (the release's `conv.get_prompt()`), for display and tests."""
    tpl = get_template(template)
    turns = validate_conversation(conversations, for_generation=generation)
    out = []
    for kind, text, _ in _segments(turns, tpl, generation):
        if kind == "eos":
            out.append("</s>")
        elif kind == "bos":
            out.append("<s>" if out else "")
        else:
            out.append(text)
    return "".join(out)
