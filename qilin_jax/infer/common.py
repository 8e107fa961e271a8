"""Shared pieces of chat, batch inference and evaluation: prompts, images, decoding to text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qilin_jax.data.conversation import IMAGE_TAG, TEMPLATES, build_prompt, get_template
from qilin_jax.data.images import load_and_preprocess


def check_tokenizer(model, tokenizer) -> None:
    """Raise ValueError when the tokenizer and the model's vocabulary / image token disagree."""
    cfg = model.config
    n = len(tokenizer)
    if n > cfg.text.vocab_size and cfg.image_token_id != n - 1:
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocabulary has {cfg.text.vocab_size}; "
            "load the tokenizer that came with the checkpoint (<checkpoint>/tokenizer)"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (</s>); answers end with it")


def template_name(template: str, system: str = "") -> str:
    """The template to pass to build_prompt: `template`, or a registered copy with another system prompt."""
    if not system:
        return template
    base = get_template(template)
    if base.style == "plain":
        raise ValueError("the plain template has no system prompt; leave `system` empty")
    name = f"{template}+system:{abs(hash(system)):x}"
    if name not in TEMPLATES:
        # qilin_jax.data has no system-prompt argument; a derived template in its registry is
        # the least invasive way to reuse its tokenization unchanged.
        TEMPLATES[name] = dataclasses.replace(base, name=name, system=system)
    return name


def prompt_ids(model, tokenizer, turns: Sequence[dict], template: str = "v1") -> np.ndarray:
    """Generation prompt ids (ends in "ASSISTANT:" for v1) for LLaVA turns ending with a human turn."""
    cfg = model.config
    return build_prompt(
        list(turns), tokenizer, template, image_tokens=cfg.image_tokens, image_token_id=cfg.image_token_id
    )


def first_turn(question: str, has_image: bool) -> dict:
    """The first human turn: "<image>\\n" + question (LLaVA's placement) when there is an image."""
    q = question.replace(IMAGE_TAG, "").strip()
    return {"from": "human", "value": f"{IMAGE_TAG}\n{q}" if has_image else q}


def load_pixels(model, refs: Sequence, names: Sequence[str] | None = None, image_mode: str = "pad") -> np.ndarray:
    """Pixel values [1, 3, S, S] for a sample's image(s) (several are composited, as in training)."""
    size = model.config.vision.image_size
    return load_and_preprocess(list(refs), names, size=size, mode=image_mode, composite=True)


def pad_batch(prompts: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [batch, max_len] and attention mask for 1-D prompts."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    return ids, mask


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


class IncrementalDecoder:
    """Turns a token stream into printable text pieces (byte-fallback pieces and stop strings held back).

    SentencePiece emits Chinese characters outside the vocabulary as several byte tokens; a
    partial character decodes to U+FFFD and is not printed until it completes. Text that could
    be the start of a stop string is held back until it cannot be any more.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        self.tokens: list[int] = []
        self.printed = ""  # text already handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def push(self, token: int) -> str:
        """The new printable text after `token` ("" while held back or after the answer ended)."""
        if self.stopped:
            return ""
        if int(token) == self.eos_id:
            self.stopped = True
            return self.flush()
        self.tokens.append(int(token))
        text = self._text()
        text, hit = cut_at_stop(text, self.stops)
        if hit:
            self.stopped = True
            return self._emit(text.rstrip())
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
            safe -= 1
        hold = 0
        for s in self.stops:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(text[: safe - hold])

    def flush(self) -> str:
        """Whatever is still held back (the answer ended)."""
        text, _ = cut_at_stop(self._text(), self.stops)
        return self._emit(text.rstrip() if self.stopped else text)

    def _emit(self, text: str) -> str:
        # Positional: a later token that changes already printed text (never seen with
        # SentencePiece) cannot be unprinted; printing continues after what was printed.
        new = text[len(self.printed) :]
        self.printed += new
        return new

    @property
    def text(self) -> str:
        """The answer so far, stop strings removed."""
        t, _ = cut_at_stop(self._text(), self.stops)
        return t.strip()


def sampling_kwargs(cfg) -> dict:
    """The keyword arguments of `generate`/`stream` for a DecodeOptions."""
    return dict(do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
