"""train.shared_prefix: cut the preamble every row of a batch starts with, so the model runs
it once per batch (QilinMedVL `prefix_ids`) instead of once per row. Exact: the cut is made
only where it changes no logit and no label."""

from __future__ import annotations

import logging

import numpy as np

from qilin_jax.config import RunConfig
from qilin_jax.data.conversation import IGNORE_INDEX

log = logging.getLogger("qilin_jax.train")

# The per-token arrays of a batch (cut by the prefix, padded across hosts).
SEQ_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids")
# Below this many tokens a shared preamble is not worth the prefix path ("plain" has only BOS).
MIN_SHARED_PREFIX = 8


def split_shared_prefix(local: dict, prefix: np.ndarray) -> dict | None:
    """The host batch with `prefix` cut from the front of every row and added once as
    `prefix_ids` (train.shared_prefix), or None if the batch does not allow it: a row that
    does not start with it, padding or a position other than 0.. inside it, or a label on
    it or on the first token after it (the prefix's last position would predict that one).
    The model then computes the prefix once for the batch (QilinMedVL `prefix_ids`)."""
    P = len(prefix)
    ids = local["input_ids"]
    if (
        P == 0
        or ids.ndim != 2
        or ids.shape[1] <= P
        or not np.array_equal(ids[:, :P], np.broadcast_to(prefix, (ids.shape[0], P)))
    ):
        return None
    if np.any(local["labels"][:, : P + 1] != IGNORE_INDEX):
        return None
    for k in ("attention_mask", "segment_ids"):
        if k in local and np.any(local[k][:, :P] != 1):
            return None
    if "position_ids" in local and np.any(local["position_ids"][:, :P] != np.arange(P)):
        return None
    out = {k: (v[:, P:] if k in SEQ_KEYS else v) for k, v in local.items()}
    out["prefix_ids"] = np.asarray(prefix, np.int32)
    return out


def stage_shared_prefix(cfg: RunConfig, data_cfg, tokenizer, model_cfg) -> np.ndarray | None:
    """The preamble the rows of this stage's batches share (train.shared_prefix), or None:
    off, packed rows (several samples per row), or a template whose preamble is too short."""
    if not cfg.train.shared_prefix:
        return None
    if data_cfg.packing:
        log.info("train.shared_prefix: off for packed rows")
        return None
    from qilin_jax.data.conversation import template_preamble

    prefix = template_preamble(tokenizer, data_cfg.template, image_token_id=model_cfg.image_token_id)
    if len(prefix) < MIN_SHARED_PREFIX:
        log.info(
            "train.shared_prefix: the %r template's preamble has %d token(s); not shared",
            data_cfg.template,
            len(prefix),
        )
        return None
    log.info("train.shared_prefix: the %d-token %r preamble runs once per batch", len(prefix), data_cfg.template)
    return prefix
