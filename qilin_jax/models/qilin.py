"""QilinMedVL: CLIP ViT -> adapter -> image features placed at the image tokens -> LLaMA-2."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qilin_jax.data.conversation import IGNORE_INDEX
from qilin_jax.models.adapter import Adapter
from qilin_jax.models.common import dense, scan_unroll
from qilin_jax.models.configs import QilinConfig
from qilin_jax.models.llama import KVCache, LlamaModel
from qilin_jax.models.vit import VisionTransformer


class QilinOutput(NamedTuple):
    """Model outputs: logits [batch, seq, vocab] (None when only the loss was asked for),
    loss (mean over supervised tokens), the number of supervised tokens, and the KV cache."""

    logits: jax.Array | None
    loss: jax.Array | None = None
    num_tokens: jax.Array | None = None
    cache: KVCache | None = None


def shift_labels(labels):
    """Labels aligned with the position that predicts them (LLaVA/HF shift), -100 at the end."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


# Per-row budgets (fractions of the row) the supervised positions are gathered into.
LOSS_BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def loss_position_budgets(seq: int) -> list[int]:
    """Static per-row slot counts to gather supervised positions into (multiples of 8, < seq)."""
    out = []
    for f in LOSS_BUDGET_FRACTIONS:
        k = -(-math.ceil(seq * f) // 8) * 8
        if 0 < k < seq and k not in out:
            out.append(k)
    return out


def _ce_sum(hidden, head_kernel, tgt, valid, chunk: int):
    """Summed cross-entropy over [B, T] positions (masked by `valid`), optionally chunked."""

    def piece(h, t, m):
        logits = dense(h, head_kernel.astype(h.dtype)).astype(jnp.float32)  # one 2-D matmul
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(m, lse - picked, 0.0))

    B, T, D = hidden.shape
    if chunk <= 0 or chunk >= T:
        return piece(hidden, tgt, valid)
    n = -(-T // chunk)
    padT = n * chunk - T
    if padT:
        hidden = jnp.pad(hidden, ((0, 0), (0, padT), (0, 0)))
        tgt = jnp.pad(tgt, ((0, 0), (0, padT)))
        valid = jnp.pad(valid, ((0, 0), (0, padT)))
    hs = hidden.reshape(B, n, chunk, D).swapaxes(0, 1)
    ts = tgt.reshape(B, n, chunk).swapaxes(0, 1)
    ms = valid.reshape(B, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda c, xs: (c + piece(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms), unroll=scan_unroll())
    return total


def cross_entropy(hidden, head_kernel, shifted, *, chunk: int = 0, supervised_only: bool = False):
    """Sum of token cross-entropies and the count of supervised tokens.

    With `chunk` > 0 the logits are computed `chunk` positions at a time in a rematerialised
    scan, so float32 logits for the whole sequence never exist at once.

    With `supervised_only` the LM head runs only where there is a label: each row's
    supervised positions are gathered (in order) into the smallest static budget
    (`loss_position_budgets`: 1/16 .. 1/2 of the row) that holds the busiest row, chosen
    on device by `lax.switch`; a batch with a row past half its length takes the
    every-position branch. Image tokens, prompts and padding never need logits, and in
    LLaVA-style data they are most of the sequence. Loss and gradients are exact either way.
    """
    valid = shifted != IGNORE_INDEX
    tgt = jnp.where(valid, shifted, 0)
    T = hidden.shape[1]
    budgets = loss_position_budgets(T) if supervised_only else []
    if not budgets:
        return _ce_sum(hidden, head_kernel, tgt, valid, chunk), jnp.sum(valid)

    def gathered(k):
        def branch(h, t, m):
            order = jnp.argsort(~m, axis=1, stable=True)[:, :k]  # supervised positions first
            return _ce_sum(
                jnp.take_along_axis(h, order[..., None], axis=1),
                head_kernel,
                jnp.take_along_axis(t, order, axis=1),
                jnp.take_along_axis(m, order, axis=1),
                chunk,
            )

        return branch

    branches = [gathered(k) for k in budgets] + [lambda h, t, m: _ce_sum(h, head_kernel, t, m, chunk)]
    busiest = jnp.max(jnp.sum(valid, axis=1))
    index = jnp.sum(busiest > jnp.asarray(budgets, jnp.int32))  # the first budget that fits
    total = jax.lax.switch(index, branches, hidden, tgt, valid)
    return total, jnp.sum(valid)


class QilinMedVL(nnx.Module):
    """The Qilin-Med-VL model (LLaVA-1.5 architecture)."""

    def __init__(self, config: QilinConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = VisionTransformer(config.vision, dtype=config.dtype, remat=config.remat, rngs=rngs)
        self.adapter = Adapter(config.adapter, config.vision.hidden_size, config.text.hidden_size, rngs=rngs)
        self.llm = LlamaModel(
            config.text, dtype=config.dtype, attention_impl=config.attention, remat=config.remat, rngs=rngs
        )

    def image_features(self, pixel_values):
        """Adapter outputs [images, image_tokens, text_dim] for pixel values [images, 3, H, W]."""
        cfg = self.config
        h = self.vision(pixel_values, layer=cfg.vision_feature_layer)
        if cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return self.adapter(h)

    def embed_inputs(self, input_ids, pixel_values=None):
        """Input embeddings with image features placed at the image-token positions.

        pixel_values [num_images, 3, H, W]: the k-th run of image tokens in the batch (row
        major) gets image k. pixel_values [batch, slots, 3, H, W]: the k-th run in row b gets
        slot k of row b (the training batch layout; unused slots are ignored).
        """
        cfg = self.config
        emb = self.llm.embed(input_ids)
        if pixel_values is None:
            return emb
        is_img = input_ids == cfg.image_token_id
        B, T = input_ids.shape
        if pixel_values.ndim == 5:
            nb, slots = pixel_values.shape[:2]
            feats = self.image_features(pixel_values.reshape((nb * slots,) + pixel_values.shape[2:]))
            feats = feats.reshape(nb, -1, feats.shape[-1])  # [B, slots*P, D]
            idx = jnp.cumsum(is_img, axis=1) - 1
            idx = jnp.clip(idx, 0, feats.shape[1] - 1)
            placed = jnp.take_along_axis(feats, idx[..., None], axis=1)
        elif pixel_values.ndim == 4:
            feats = self.image_features(pixel_values)
            flat = feats.reshape(-1, feats.shape[-1])
            idx = jnp.cumsum(is_img.reshape(-1)) - 1
            idx = jnp.clip(idx, 0, flat.shape[0] - 1)
            placed = jnp.take(flat, idx, axis=0).reshape(B, T, -1)
        else:
            raise ValueError(
                f"pixel_values must be [images, 3, H, W] or [batch, slots, 3, H, W], got shape {pixel_values.shape}"
            )
        return jnp.where(is_img[..., None], placed.astype(emb.dtype), emb)

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        *,
        labels=None,
        position_ids=None,
        segment_ids=None,
        cache: KVCache | None = None,
        packed: bool = False,
        return_logits: bool = True,
        prefix_ids=None,
    ) -> QilinOutput:
        """Logits (and loss when labels are given) for token ids [batch, seq] and images.

        attention_mask: 1 for real tokens, 0 for padding (None = all ones). segment_ids
        (packed rows) takes precedence over attention_mask. position_ids default to
        0..n-1 over the real tokens of each row.

        prefix_ids (training): [P] text ids (no image token) that every row starts with but
        that were cut from input_ids, labels and the masks (`train.shared_prefix`): the
        decoder computes them once for the whole batch and the rows attend to them; positions
        then start at P. The prefix has no labels, and the label of the rows' first token
        must be -100 too (the prefix's last position would predict it). Loss, logits and
        gradients equal those of the full rows.
        """
        input_ids = jnp.asarray(input_ids)
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
        if segment_ids is None:
            segment_ids = (jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)).astype(
                jnp.int32
            )
        P = 0 if prefix_ids is None else math.prod(jnp.shape(prefix_ids))
        if position_ids is None and cache is None:
            position_ids = jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0).astype(jnp.int32) + P
        emb = self.embed_inputs(input_ids, pixel_values)
        prefix_embeds = None if prefix_ids is None else self.llm.embed(jnp.reshape(prefix_ids, (1, P)))
        hidden, new_cache = self.llm(
            emb,
            segment_ids=segment_ids,
            position_ids=position_ids,
            cache=cache,
            packed=packed,
            prefix_embeds=prefix_embeds,
        )
        loss = n = None
        if labels is not None:
            total, n = cross_entropy(
                hidden,
                self.llm.head_kernel(),
                shift_labels(jnp.asarray(labels)),
                chunk=self.config.loss_chunk,
                supervised_only=self.config.loss_supervised_only,
            )
            loss = total / jnp.maximum(n, 1)
        logits = self.llm.logits(hidden) if return_logits else None
        return QilinOutput(logits, loss, n, new_cache)


def param_count(config: QilinConfig) -> dict[str, int]:
    """Parameter counts by part, from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: QilinMedVL(config, rngs=nnx.Rngs(0)))
    out = {}
    for part in ("vision", "adapter", "llm"):
        state = nnx.state(getattr(abstract, part), nnx.Param)
        out[part] = sum(int(x.size) for x in jax.tree.leaves(state))
    out["total"] = sum(out.values())
    return out
