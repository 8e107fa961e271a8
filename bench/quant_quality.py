"""Benchmark: how far weight-only quantization moves a trained checkpoint's next-token
distribution, on the demo's held-out questions.

    python bench/quant_quality.py [--checkpoint runs/demo/stage2/final]
        [--heldout data/demo/generated/heldout.json] [--n 60] [--kinds int8,int4,nf4]

For each of the first --n held-out questions: the v1 prompt with its image, the logits at the
prompt's last position (the first answer token) in float32 and with the LLM's matrices
quantized at load time (`load_pretrained(quantize=)`). Reports per kind the mean and max
KL(float32 || quantized) and the share of prompts whose argmax is unchanged. Held-out
accuracy by type is the evaluation's (docs/finetuning.md gives the commands).

--wide-layer adds one decoder layer of the 13B's width (hidden 5120, MLP 13824, 40 heads) with
random weights: the relative error ||h_q - h|| / ||h|| of its output hidden states on random
inputs [1, --wide-tokens, 5120], per kind, and the KL of softmax over those hidden states
read as logits (a scale-free view of the same error). Prints one JSON line and a one-line
summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 (after the sys.path line)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/stage2/final")
    ap.add_argument("--heldout", default="data/demo/generated/heldout.json")
    ap.add_argument("--images", default="", help="image folder (default: images/ next to --heldout)")
    ap.add_argument("--tokenizer", default=str(ROOT / "qilin_jax" / "demo_data" / "tokenizer"))
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--kinds", default="int8,int4,nf4")
    ap.add_argument("--wide-layer", action="store_true", help="also one random 13B-wide decoder layer")
    ap.add_argument("--wide-tokens", type=int, default=64)
    ap.add_argument("--skip-checkpoint", action="store_true", help="only --wide-layer")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import qilin_jax
    from qilin_jax.infer.common import first_turn, load_pixels, prompt_ids

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [] if args.skip_checkpoint else json.load(open(args.heldout, encoding="utf-8"))[: args.n]
    images = args.images or os.path.join(os.path.dirname(args.heldout), "images")

    def last_logits(model) -> np.ndarray:
        out = []
        for r in rows:
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            ids = prompt_ids(model, tok, [first_turn(question, True)], "v1")
            px = load_pixels(model, [os.path.join(images, r["image"])])
            out.append(np.asarray(model(np.asarray(ids)[None], px).logits[0, -1], np.float64))
        return np.stack(out)

    res = {"checkpoint": args.checkpoint, "prompts": len(rows), "kinds": {}}
    if not args.skip_checkpoint:
        ref = last_logits(qilin_jax.load_pretrained(args.checkpoint))
        lp_ref = log_softmax(ref)
        for kind in args.kinds.split(","):
            other = last_logits(qilin_jax.load_pretrained(args.checkpoint, quantize=kind))
            kl = (np.exp(lp_ref) * (lp_ref - log_softmax(other))).sum(-1)
            res["kinds"][kind] = {
                "mean_kl": float(kl.mean()),
                "max_kl": float(kl.max()),
                "argmax_equal": float((ref.argmax(-1) == other.argmax(-1)).mean()),
            }
    if args.wide_layer:
        res["wide_layer"] = wide_layer(args.kinds.split(","), args.wide_tokens)
    print(json.dumps(res))
    parts = [f"{k} KL {v['mean_kl']:.2e} argmax {v['argmax_equal']:.2f}" for k, v in res["kinds"].items()]
    parts += [f"13B-wide layer {k} rel err {v['rel_err']:.2e}" for k, v in res.get("wide_layer", {}).items()]
    print("quant quality: " + ", ".join(parts))
    return res


def wide_layer(kinds: list[str], tokens: int) -> dict:
    """Per kind: relative error and softmax KL of one random 13B-wide decoder layer's output."""
    import jax
    from flax import nnx

    from qilin_jax.models import QilinMedVL
    from qilin_jax.models.configs import from_preset
    from qilin_jax.models.quant import quantize_model

    cfg = from_preset(
        "qilin_med_vl_13b",
        {"vision": {"num_hidden_layers": 1, "image_size": 28}, "text": {"num_hidden_layers": 1, "vocab_size": 256}},
    )
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, tokens, cfg.text.hidden_size)), np.float32)

    def hidden(model) -> np.ndarray:
        return np.asarray(model.llm(x)[0][0], np.float64)

    ref = hidden(QilinMedVL(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for kind in kinds:
        h = hidden(quantize_model(QilinMedVL(cfg, rngs=nnx.Rngs(0)), kind))
        a, b = log_softmax(ref), log_softmax(h)
        out[kind] = {
            "rel_err": float(np.linalg.norm(h - ref) / np.linalg.norm(ref)),
            "mean_kl": float((np.exp(a) * (a - b)).sum(-1).mean()),
        }
    return out


if __name__ == "__main__":
    main()
