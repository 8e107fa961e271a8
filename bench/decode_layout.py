"""Benchmark: CPU decoding with the cached decoder layers' matrices kept [in, out] (the
model's layout) against [out, in] (what `llama.layer_list` keeps now), side by side in one
process, same model, prompt (bench/generate.py's) and greedy tokens.

    python bench/decode_layout.py [--models tiny,medium] [--new-tokens 64] [--repeats 5] [--text-tokens 32]

Both layouts are put in `generate`'s per-model layer cache in turn, so the only difference is
how the matrix-vector products read the weights. Timing: --repeats interleaved rounds, each
timing a 1-token call (t1: the prefill) and an N-token call (tN) as bench/generate.py does
(the best of at least 1 s of runs); the best round counts. decode tokens/s = (N - 1) / (tN - t1).
Prints one JSON line and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

LAYOUTS = ("in_out", "out_in")


def measure(name: str, new_tokens: int, repeats: int, text_tokens: int) -> dict:
    import jax
    from flax import nnx

    from bench.generate import _best_time, make_prompt, model_config
    from qilin_jax.infer import generate as G
    from qilin_jax.models import QilinMedVL
    from qilin_jax.models import llama as Lm
    from qilin_jax.models.common import stacked_values

    cfg = model_config(name)
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids, px = make_prompt(cfg, 1, text_tokens)  # bench/generate.py's prompt: BOS, image, text
    layers = {
        v: jax.block_until_ready(
            jax.jit(lambda s, t=(v == "out_in"): Lm.layer_list(nnx.merge(graphdef, s).llm.layers, transpose=t))(state)
        )
        for v in LAYOUTS
    }
    stacked = tuple(jax.tree.leaves(stacked_values(model.llm.layers)))

    def call(v: str, n: int):
        G._LAYER_CACHE[model] = (stacked, layers[v])  # what cached_layers would hold
        return np.asarray(G.generate(model, ids, px, max_new_tokens=n, eos_token_id=-1))

    tokens = {}
    for v in LAYOUTS:  # compile, warm up
        call(v, 1)
        tokens[v] = call(v, new_tokens)
    # Interleaved rounds; each figure is bench/generate.py's best time (>= 1 s of runs).
    times = {v: {"t1": [], "tN": []} for v in LAYOUTS}
    for _ in range(repeats):
        for v in LAYOUTS:
            times[v]["t1"].append(_best_time(lambda v=v: call(v, 1), 1))
            times[v]["tN"].append(_best_time(lambda v=v: call(v, new_tokens), 1))
    res = {
        "model": name,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "greedy_tokens_equal": bool((tokens["in_out"] == tokens["out_in"]).all()),
    }
    for v in LAYOUTS:
        t1, tN = min(times[v]["t1"]), min(times[v]["tN"])
        res[v] = {"prefill_s": round(t1, 5), "decode_tokens_per_s": round((new_tokens - 1) / (tN - t1), 2)}
    res["decode_out_in_over_in_out"] = round(
        res["out_in"]["decode_tokens_per_s"] / res["in_out"]["decode_tokens_per_s"], 3
    )
    res["prefill_out_in_over_in_out"] = round(res["out_in"]["prefill_s"] / res["in_out"]["prefill_s"], 3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image in the prompt")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is tN - t1)")
    import jax

    models = {m: measure(m, args.new_tokens, args.repeats, args.text_tokens) for m in args.models.split(",") if m}
    out = {"bench": "decode_layout", "device": jax.default_backend(), "repeats": args.repeats, "models": models}
    print(json.dumps(out))
    print(
        "; ".join(
            f"{m}: decode {r['out_in']['decode_tokens_per_s']} tok/s [out, in] vs "
            f"{r['in_out']['decode_tokens_per_s']} [in, out] ({r['decode_out_in_over_in_out']:.2f}x), "
            f"prefill {r['prefill_out_in_over_in_out']:.2f}x the time, same tokens: {r['greedy_tokens_equal']}"
            for m, r in models.items()
        )
    )


if __name__ == "__main__":
    main()
