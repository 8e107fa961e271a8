"""Benchmark: a LoRA / QLoRA stage-2 train step against the full stage-2 step, and quantized
decoding (int8 / int4 / nf4) against float32, side by side in one process on this machine.

    python bench/lora.py [--config configs/bench/cpu.yaml] [--rank 128] [--repeats 3]
                         [--decode-model medium] [--new-tokens 32] [--skip-decode] [--skip-train]

Train: the bench config's model and batch (configs/bench/cpu.yaml: hidden 1024, seq 737),
stage 2 three ways: `full` (LLM + adapter trained), `lora` (adapters of --rank on every
decoder matrix + the adapter, LLM frozen), `qlora` (the same over an NF4 LLM); median step
time over interleaved repeats after a warm-up, and the compiled step's memory
(`memory_analysis`: arguments = parameters + optimizer state + batch, temporaries).
Decode: bench/generate.py's method (best time of 1 and N new tokens, greedy, batch 1;
decode tokens/s = (N - 1) / (tN - t1)) for float32 and each quantized kind, plus each kind's
weight bytes, the greedy tokens' agreement with float32 and the mean logit KL on the prompt.
Prints one JSON line and a one-line summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_step(cfg, batch, variant: str, rank: int):
    """(compiled step, state, frozen, global batch, trainable parameter count) of a variant."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qilin_jax import sharding as S
    from qilin_jax.config import LoraConfig, RunConfig, StageConfig
    from qilin_jax.train.distributed import batch_shardings, to_global
    from qilin_jax.train.lora import prepare_stage
    from qilin_jax.train.optim import make_optimizer
    from qilin_jax.train.state import init_params, init_stage_state, model_parts
    from qilin_jax.train.step import train_step

    mesh = S.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = S.DEFAULT_RULES
    parts = model_parts(cfg, mesh, rules)
    params = init_params(parts, 0, None, mesh, rules)
    micro = {k: v[None] for k, v in batch.items()}
    b_sh = batch_shardings(mesh, rules, micro)
    gbatch = to_global(micro, b_sh)
    lora = variant != "full"
    st = StageConfig(
        name="stage2",
        trainable=["adapter/.*"] if lora else ["llm/.*", "adapter/.*"],
        learning_rate=2e-4,
        warmup_ratio=0.0,
        lora=lora,
    )
    run = RunConfig()
    run.train.lora = LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.05, trainable_learning_rate=2e-5)
    run.model.quantize = "nf4" if variant == "qlora" else None
    parts, params, patterns, scales, dropout = prepare_stage(run, st, parts, params, mesh, rules)
    tx, schedule = make_optimizer(st, 1000, scales)
    state, frozen, state_sh, f_sh = init_stage_state(parts, params, patterns, tx, mesh)
    repl = NamedSharding(mesh, P())
    fn = functools.partial(train_step, parts.graphdef, tx, schedule, lora_dropout=dropout)
    jitted = jax.jit(fn, donate_argnums=(0,), in_shardings=(state_sh, f_sh, b_sh), out_shardings=(state_sh, repl))
    compiled = jitted.lower(state, frozen, gbatch).compile()
    n = sum(int(x.size) for x in jax.tree.leaves(state.trainable))
    return compiled, state, frozen, gbatch, n


def bench_train(args) -> dict:
    import jax

    from bench.train_step import load_bench_config, make_batch

    cfg, raw = load_bench_config(args.config, jax.default_backend())
    b = raw.get("batch", {})
    batch = make_batch(cfg, b.get("rows", 2), b.get("text_tokens", 160), b.get("pad_last_row", 0))
    names = ["full", "lora", "qlora"]
    built, out = {}, {}
    for name in names:
        compiled, state, frozen, gb, n = build_step(cfg, batch, name, args.rank)
        m = compiled.memory_analysis()
        out[name] = {
            "trainable_params": n,
            "argument_mb": round(m.argument_size_in_bytes / 2**20, 1),
            "temp_mb": round(m.temp_size_in_bytes / 2**20, 1),
        }
        state, met = compiled(state, frozen, gb)  # warm-up
        jax.block_until_ready(met)
        built[name] = [compiled, state, frozen, gb]
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            compiled, state, frozen, gb = built[n]
            t = time.perf_counter()
            state, met = compiled(state, frozen, gb)
            jax.block_until_ready((state, met))
            times[n].append(time.perf_counter() - t)
            built[n][1] = state
    for n in names:
        out[n]["step_s"] = round(statistics.median(times[n]), 4)
        out[n]["vs_full"] = round(statistics.median(times[n]) / statistics.median(times["full"]), 3)
    return {
        "model": {
            "hidden": cfg.text.hidden_size,
            "layers": cfg.text.num_hidden_layers,
            "seq": int(batch["input_ids"].shape[1]),
            "rows": int(batch["input_ids"].shape[0]),
        },
        "rank": args.rank,
        "variants": out,
    }


def _best(fn, repeats: int, min_s: float = 1.0) -> float:
    times, t_all = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_all < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_decode(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import qilin_jax
    from bench.generate import model_config
    from qilin_jax.models import QilinMedVL
    from qilin_jax.models import quant as Q

    cfg = model_config(args.decode_model)
    base = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(base)
    rng = np.random.default_rng(0)
    prompt = np.concatenate([[1], [cfg.image_token_id] * cfg.image_tokens, rng.integers(3, 1000, 24)])[None]
    px = rng.normal(size=(1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    ref_logits = np.asarray(base(prompt, px).logits[0], np.float32)
    out = {}
    ref_tokens = None
    for kind in ["float32", *Q.KINDS]:
        model = nnx.merge(g, jax.tree.map(jnp.array, s))
        if kind != "float32":
            Q.quantize_model(model, kind)
        layer_bytes = sum(
            int(v.get_value().nbytes) for v in vars(model.llm.layers).values() if isinstance(v, nnx.Param)
        )

        def run(n, m=model):
            return qilin_jax.generate(m, prompt, px, max_new_tokens=n, eos_token_id=-1)

        toks = run(args.new_tokens)  # warm-up (compiles both lengths' programs)
        run(1)
        t1 = _best(functools.partial(run, 1), args.repeats)
        tn = _best(functools.partial(run, args.new_tokens), args.repeats)
        lg = np.asarray(model(prompt, px).logits[0], np.float32)
        lp, lq = jax.nn.log_softmax(ref_logits, -1), jax.nn.log_softmax(lg, -1)
        kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
        if ref_tokens is None:
            ref_tokens = toks
        out[kind] = {
            "decode_tokens_per_s": round((args.new_tokens - 1) / max(tn - t1, 1e-9), 2),
            "decoder_weight_mb": round(layer_bytes / 2**20, 2),
            "greedy_agreement": round(float(np.mean(toks == ref_tokens)), 3),
            "logit_kl": kl,
        }
    f = out["float32"]["decode_tokens_per_s"]
    for row in out.values():
        row["vs_float32"] = round(row["decode_tokens_per_s"] / f, 3)
    return {"model": args.decode_model, "new_tokens": args.new_tokens, "kinds": out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench/cpu.yaml"))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-model", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)

    import jax

    res = {"platform": jax.default_backend()}
    if not args.skip_train:
        res["train"] = bench_train(args)
    if not args.skip_decode:
        res["decode"] = bench_decode(args)
    print(json.dumps(res))
    parts = []
    if "train" in res:
        v = res["train"]["variants"]
        parts.append("step " + ", ".join(f"{n} {v[n]['step_s']:.3f}s ({v[n]['vs_full']:.2f}x)" for n in v))
    if "decode" in res:
        k = res["decode"]["kinds"]
        parts.append("decode " + ", ".join(f"{n} {k[n]['decode_tokens_per_s']:.1f} tok/s" for n in k))
    print("; ".join(parts))


if __name__ == "__main__":
    main()
