"""One sample: a source row -> checked conversation -> prompt -> tokens and labels -> decoded,
composited and resized image pixels; a bad row becomes a skip record naming its file and line."""

from __future__ import annotations

import os

import numpy as np

from qilin_jax.data import images as images_lib
from qilin_jax.data.config import DataConfig
from qilin_jax.data.conversation import (
    default_image_token_id,
    prepare_conversation,
    tokenize_conversation,
    validate_conversation,
)
from qilin_jax.data.errors import DataError
from qilin_jax.data.prompts import apply_prompt
from qilin_jax.data.sources import row_to_sample


class SampleProcessor:
    """Turns a source index into a sample dict, or a skip record {"skip": reason, ...}."""

    def __init__(self, cfg: DataConfig, tokenizer, source, epoch_length: int, decode_images: bool = True):
        self.cfg = cfg
        self.decode_images = decode_images  # False: only check image files exist (fast audit)
        self.tokenizer = tokenizer
        self.source = source
        self.epoch_length = max(1, epoch_length)
        self.image_tokens = cfg.resolved_image_tokens()
        self.image_token_id = (
            cfg.image_token_id if cfg.image_token_id is not None else default_image_token_id(tokenizer)
        )
        self.row_length = cfg.row_length()

    def process(self, index: int) -> dict:
        """Returns {"input_ids", "labels", "pixel_values", "id"} for source row `index`; raises DataError."""
        cfg = self.cfg
        item = self.source[index]
        sample_id, refs, names, conversations = row_to_sample(
            item,
            getattr(self.source, "image_folder", cfg.image_folder) or cfg.image_folder,
            pmc_style=cfg.pmc_vqa_style,
            pmc_language=cfg.pmc_vqa_language,
        )
        conversations = validate_conversation(conversations)
        if cfg.prompt_mode != "none":
            conversations = apply_prompt(
                conversations, cfg.prompt_mode, seed=cfg.seed, key=index, language=cfg.prompt_language
            )
        conversations = prepare_conversation(
            conversations,
            len(refs),
            composite=cfg.composite,
            composite_max=cfg.composite_max,
            move_image_to_front=cfg.move_image_to_front,
        )
        n_img = (1 if refs else 0) if cfg.composite else len(refs)
        limit = self.row_length
        if cfg.max_length is not None:
            limit = min(limit, cfg.max_length + n_img * (self.image_tokens - 1))
        ids, labels = tokenize_conversation(
            conversations,
            self.tokenizer,
            cfg.template,
            self.image_tokens,
            self.image_token_id,
            max_length=limit,
        )
        if not self.decode_images:
            for r in refs:
                if isinstance(r, str) and not os.path.exists(r):
                    raise DataError("missing_image", f"image file not found: {r} (check image_folder)")
            return {
                "input_ids": ids,
                "labels": labels,
                "id": sample_id,
                "pixel_values": np.zeros((n_img, 3, 1, 1), np.float32),
            }
        pixels = images_lib.load_and_preprocess(
            refs,
            names,
            size=cfg.image_size,
            mode=cfg.image_mode,
            composite=cfg.composite,
            composite_max=cfg.composite_max,
            dicom_percentiles=tuple(cfg.dicom_window_percentiles),
            draft_size=cfg.jpeg_draft_size,
        )
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "id": sample_id}

    def describe(self, index: int) -> str:
        """Returns 'file:line (id ...)' for error messages."""
        try:
            item = self.source[index]
            row = item.get("row")
            sid = row.get("id") if isinstance(row, dict) else None
            return f"{item.get('origin', '?')} (source index {index}" + (f", id {sid!r})" if sid else ")")
        except Exception:  # describing must never fail
            return f"source index {index}"

    def __call__(self, position: int, index: int) -> dict:
        epoch = int(position // self.epoch_length)
        try:
            out = self.process(int(index))
        except DataError as e:
            where = self.describe(int(index))
            if self.cfg.strict:
                raise DataError(
                    e.reason, f"{where}: {e} [{e.reason}; set data.strict=false to skip and count such samples]"
                ) from e
            return {"skip": e.reason, "detail": f"{where}: {e}", "epoch": epoch, "index": int(index)}
        out["epoch"] = epoch
        out["index"] = int(index)
        return out
