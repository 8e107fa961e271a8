"""Chat about one image (JPEG/PNG/DICOM): multi-turn, streamed to the terminal, or one-shot.

Each turn re-prefills the whole conversation (the image, the earlier questions and answers,
the new question) in the template the checkpoint was trained with, as the release's CLI
does, then streams tokens with the KV cache. Commands: /image PATH (new image, new
conversation), /reset, /help, /exit (or end of input).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from qilin_jax.data.errors import DataError
from qilin_jax.infer.common import (
    IncrementalDecoder,
    check_tokenizer,
    first_turn,
    load_pixels,
    prompt_ids,
    sampling_kwargs,
    template_name,
)
from qilin_jax.infer.config import ChatConfig

HELP = (
    "commands: /image PATH  load an image (JPEG/PNG/DICOM) and start a new conversation\n"
    "          /reset       forget the conversation (keep the image)\n"
    "          /exit        quit (also /quit or end of input)"
)


class ChatSession:
    """A conversation about one image; `ask` answers the next question (streamed to a callback)."""

    def __init__(self, model, tokenizer, cfg: ChatConfig | None = None, *, mesh=None):
        from qilin_jax.infer.sharded import prepare

        self.cfg = cfg or ChatConfig()
        self.cfg.validate("chat")
        check_tokenizer(model, tokenizer)
        self.model, self.mesh = (model, mesh) if mesh is not None else prepare(model, self.cfg.tensor_parallel)
        self.tokenizer = tokenizer
        self.template = template_name(self.cfg.template, self.cfg.system)
        self.pixels = None
        self.image_path = ""
        self.history: list[dict] = []  # LLaVA turns of the finished rounds
        self.image_in_history = False  # whether the first history turn holds the <image> tag
        if self.cfg.image:
            self.set_image(self.cfg.image)

    def set_image(self, path: str) -> None:
        """Load an image (DataError names the file if missing/corrupt) and start a new conversation."""
        self.pixels = load_pixels(self.model, [path], [path], self.cfg.image_mode)
        self.image_path = path
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the image stays."""
        self.history = []
        self.image_in_history = False

    def _max_prompt(self) -> int:
        limit = self.model.config.text.max_position_embeddings - self.cfg.max_new_tokens
        return min(limit, self.cfg.max_context) if self.cfg.max_context else limit

    def _turns_for(self, question: str) -> tuple[list[dict], bool]:
        """The turns to prompt with (oldest rounds dropped to fit), and whether they hold the image."""
        history = [dict(t) for t in self.history]
        image_first = self.image_in_history
        has_image = self.pixels is not None
        while True:
            if history:
                turns = history + [{"from": "human", "value": question.strip()}]
            else:
                turns = [first_turn(question, has_image)]
            n = len(prompt_ids(self.model, self.tokenizer, turns, self.template))
            if n <= self._max_prompt():
                return turns, has_image and (image_first or not history)
            if not history:
                raise ValueError(
                    f"the question is {n} prompt tokens, more than the {self._max_prompt()} "
                    "allowed (max_position_embeddings - max_new_tokens); shorten it or "
                    "lower chat.max_new_tokens"
                )
            # Drop the oldest round; the image moves to the next round so it stays in view.
            history = history[2:]
            if history and image_first:
                history[0] = first_turn(history[0]["value"], True)

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """The answer to `question` given the conversation so far; pieces go to on_text as they decode."""
        from qilin_jax.infer.generate import stream
        from qilin_jax.infer.sharded import inference_sharding

        turns, with_image = self._turns_for(question)
        ids = prompt_ids(self.model, self.tokenizer, turns, self.template)
        pixels = self.pixels if with_image else None
        dec = IncrementalDecoder(self.tokenizer, self.cfg.stop)
        cfg = self.cfg
        try:
            with inference_sharding(self.mesh):
                for tok in stream(
                    self.model,
                    ids[None],
                    pixels,
                    None,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **sampling_kwargs(cfg),
                ):
                    piece = dec.push(int(tok[0]))
                    if piece and on_text is not None:
                        on_text(piece)
                    if dec.stopped:
                        break
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            pass
        if not dec.stopped:
            piece = dec.flush()
            if piece and on_text is not None:
                on_text(piece)
        answer = dec.text
        self.history = turns + [{"from": "gpt", "value": answer}]
        self.image_in_history = with_image
        return answer


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def run_chat(
    model, tokenizer, chat_cfg: ChatConfig, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, mesh=None
) -> list[dict]:
    """Chat on stdin/stdout (one-shot when chat_cfg.question is set); returns the last conversation's turns."""
    session = ChatSession(model, tokenizer, chat_cfg, mesh=mesh)
    cfg = session.cfg
    emit = (lambda s: _write(stdout, s)) if cfg.stream else None

    if cfg.question:
        answer = session.ask(cfg.question, emit)
        _write(stdout, ("" if cfg.stream else answer) + "\n")
        return session.history

    _write(stdout, f"Qilin-Med-VL chat. image: {session.image_path or '(none)'}. Type /help for commands.\n")
    while True:
        _write(stdout, "USER: ")
        line = stdin.readline()
        if not line:  # end of input
            _write(stdout, "\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            cmd = cmd.lower()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                _write(stdout, "(conversation reset)\n")
            elif cmd == "/image":
                path = arg.strip().strip("'\"")
                if not path:
                    _write(stdout, "usage: /image PATH\n")
                    continue
                try:
                    session.set_image(path)
                    _write(stdout, f"(image loaded: {path}; new conversation)\n")
                except (DataError, OSError, ValueError) as e:
                    _write(stdout, f"error: {e}\n")
            elif cmd == "/help":
                _write(stdout, HELP + "\n")
            else:
                _write(stdout, f"unknown command {cmd}\n{HELP}\n")
            continue
        _write(stdout, "ASSISTANT: ")
        try:
            answer = session.ask(text, emit)
        except ValueError as e:
            _write(stdout, f"error: {e}\n")
            continue
        _write(stdout, ("" if cfg.stream else answer) + "\n")
    return session.history
