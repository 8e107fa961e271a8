"""Benchmark: how far weight-only quantization moves a trained checkpoint's next-token
distribution, on the demo's held-out questions.

    python bench/quant_quality.py [--checkpoint runs/demo/stage2/final]
        [--heldout data/demo/generated/heldout.json] [--n 60] [--kinds int8,int4,nf4]

For each of the first --n held-out questions: the v1 prompt with its image, the logits at the
prompt's last position (the first answer token) in float32 and with the LLM's matrices
quantized at load time (`load_pretrained(quantize=)`). Reports per kind the mean and max
KL(float32 || quantized) and the share of prompts whose argmax is unchanged. Held-out
accuracy by type is the evaluation's (docs/finetuning.md gives the commands). Prints one
JSON line and a one-line summary.
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
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import qilin_jax
    from qilin_jax.infer.common import first_turn, load_pixels, prompt_ids

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = json.load(open(args.heldout, encoding="utf-8"))[: args.n]
    images = args.images or os.path.join(os.path.dirname(args.heldout), "images")

    def last_logits(model) -> np.ndarray:
        out = []
        for r in rows:
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            ids = prompt_ids(model, tok, [first_turn(question, True)], "v1")
            px = load_pixels(model, [os.path.join(images, r["image"])])
            out.append(np.asarray(model(np.asarray(ids)[None], px).logits[0, -1], np.float64))
        return np.stack(out)

    ref = last_logits(qilin_jax.load_pretrained(args.checkpoint))
    lp_ref = log_softmax(ref)
    res = {"checkpoint": args.checkpoint, "prompts": len(rows), "kinds": {}}
    for kind in args.kinds.split(","):
        other = last_logits(qilin_jax.load_pretrained(args.checkpoint, quantize=kind))
        kl = (np.exp(lp_ref) * (lp_ref - log_softmax(other))).sum(-1)
        res["kinds"][kind] = {
            "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()),
            "argmax_equal": float((ref.argmax(-1) == other.argmax(-1)).mean()),
        }
    print(json.dumps(res))
    print(
        "quant quality: "
        + ", ".join(f"{k} KL {v['mean_kl']:.2e} argmax {v['argmax_equal']:.2f}" for k, v in res["kinds"].items())
    )
    return res


if __name__ == "__main__":
    main()
