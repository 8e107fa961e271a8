"""Benchmark: CPU decoding with the cached decoder layers' matrices kept [in, out] (the
model's layout) against [out, in] (what `llama.layer_list` keeps now), side by side in one
process, same model, prompt and greedy tokens.

    python bench/decode_layout.py [--models tiny,medium] [--new-tokens 64] [--repeats 5]

Both layouts are put in `generate`'s per-model layer cache in turn, so the only difference is
how the matrix-vector products read the weights. Timing as in bench/generate.py: the best of
--repeats interleaved runs of a 1-token call (t1: the prefill) and an N-token call (tN);
decode tokens/s = (N - 1) / (tN - t1). Prints one JSON line and a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

LAYOUTS = ("in_out", "out_in")


def measure(name: str, new_tokens: int, repeats: int) -> dict:
    import jax
    from flax import nnx

    from bench.generate import model_config
    from qilin_jax.infer import generate as G
    from qilin_jax.models import QilinMedVL
    from qilin_jax.models import llama as Lm
    from qilin_jax.models.common import stacked_values

    cfg = model_config(name)
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompt = 97 if name == "medium" else 49
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size - 1, size=(1, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    layers = {v: jax.block_until_ready(jax.jit(
        lambda s, t=(v == "out_in"): Lm.layer_list(nnx.merge(graphdef, s).llm.layers, transpose=t))(state))
        for v in LAYOUTS}
    stacked = tuple(jax.tree.leaves(stacked_values(model.llm.layers)))

    def run(v: str, n: int):
        G._LAYER_CACHE[model] = (stacked, layers[v])  # what cached_layers would hold
        t = time.perf_counter()
        out = np.asarray(G.generate(model, ids, None, mask, max_new_tokens=n, eos_token_id=-1))
        return time.perf_counter() - t, out

    tokens = {}
    for v in LAYOUTS:  # compile, warm up
        run(v, 1)
        tokens[v] = run(v, new_tokens)[1]
    times = {v: {"t1": [], "tN": []} for v in LAYOUTS}
    for _ in range(repeats):
        for v in LAYOUTS:
            times[v]["t1"].append(run(v, 1)[0])
            times[v]["tN"].append(run(v, new_tokens)[0])
    res = {"model": name, "prompt_tokens": prompt, "new_tokens": new_tokens,
           "greedy_tokens_equal": bool((tokens["in_out"] == tokens["out_in"]).all())}
    for v in LAYOUTS:
        t1, tN = min(times[v]["t1"]), min(times[v]["tN"])
        res[v] = {"prefill_s": round(t1, 5), "decode_tokens_per_s": round((new_tokens - 1) / (tN - t1), 2)}
    res["decode_out_in_over_in_out"] = round(res["out_in"]["decode_tokens_per_s"]
                                             / res["in_out"]["decode_tokens_per_s"], 3)
    res["prefill_out_in_over_in_out"] = round(res["out_in"]["prefill_s"] / res["in_out"]["prefill_s"], 3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is tN - t1)")
    import jax

    models = {m: measure(m, args.new_tokens, args.repeats) for m in args.models.split(",") if m}
    out = {"bench": "decode_layout", "device": jax.default_backend(), "repeats": args.repeats, "models": models}
    print(json.dumps(out))
    print("; ".join(f"{m}: decode {r['out_in']['decode_tokens_per_s']} tok/s [out, in] vs "
                    f"{r['in_out']['decode_tokens_per_s']} [in, out] ({r['decode_out_in_over_in_out']:.2f}x), "
                    f"prefill {r['prefill_out_in_over_in_out']:.2f}x the time, same tokens: {r['greedy_tokens_equal']}"
                    for m, r in models.items()))


if __name__ == "__main__":
    main()
