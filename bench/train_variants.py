"""Benchmark: the measured effect of each speed/memory setting on our train step, one at a time
against a baseline, in one process (variants interleaved, median over repeats).

    python bench/train_variants.py [--config configs/bench/cpu.yaml] [--stage stage2] [--repeats 3]
                                   [--variants baseline,remat_full,remat_save_dots,loss_chunk_256,no_donation]

Each variant is the config's platform settings with one change; reported: step time, its
ratio to the baseline, and the compiled program's memory (`memory_analysis`: temporaries,
donated/aliased bytes, arguments). Prints one JSON line and a one-line summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "baseline": {},
    "remat_full": {"remat": "full"},
    "remat_save_dots": {"remat": "save_dots"},
    "loss_chunk_256": {"loss_chunk": 256},
    "remat_full_loss_chunk_256": {"remat": "full", "loss_chunk": 256},
    "no_donation": {"_donate": False},
    "remat_none": {"remat": "none"},
    "remat_none_loss_whole": {"remat": "none", "loss_chunk": 0},
    "remat_save_dots_loss_whole": {"remat": "save_dots", "loss_chunk": 0},
    "unrolled_layers": {"_unroll": True},  # layer scans fully unrolled at trace time
    # the LM head on the supervised positions only (qilin.cross_entropy), on or off
    "loss_supervised_only": {"loss_supervised_only": True},
    "loss_every_position": {"loss_supervised_only": False},
    # jax.nn.dot_product_attention instead of our XLA attention (custom VJP, causal blocks)
    "attention_reference": {"attention": "xla_reference"},
    # the plain optax chain (clip_by_global_norm -> adamw) with the step's keep-selects after
    # it, instead of GuardedAdamW (the same numbers; train/optim.py says why it is faster)
    "optimizer_reference": {"_optimizer": "reference"},
}


def build(cfg, batch, stage: str, donate: bool, optimizer: str = "guarded"):
    """(compiled step, state, frozen, global batch) for one variant."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bench.train_step import STAGES
    from qilin_jax import sharding as S
    from qilin_jax.config import StageConfig
    from qilin_jax.train.distributed import batch_shardings, to_global
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
    st = StageConfig(name=stage, trainable=STAGES[stage], learning_rate=1e-5, warmup_ratio=0.0)
    tx, schedule = make_optimizer(st, 1000)
    if optimizer == "reference":
        tx = tx.reference
    state, frozen, state_sh, f_sh = init_stage_state(parts, params, st.trainable, tx, mesh)
    repl = NamedSharding(mesh, P())
    import functools

    fn = functools.partial(train_step, parts.graphdef, tx, schedule)
    jitted = jax.jit(
        fn, donate_argnums=(0,) if donate else (), in_shardings=(state_sh, f_sh, b_sh), out_shardings=(state_sh, repl)
    )
    compiled = jitted.lower(state, frozen, gbatch).compile()
    return compiled, state, frozen, gbatch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench/cpu.yaml"))
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)

    import jax

    from bench.train_step import load_bench_config, make_batch

    plat = jax.default_backend()
    base, raw = load_bench_config(args.config, plat)
    b = raw.get("batch", {})
    batch = make_batch(base, b.get("rows", 2), b.get("text_tokens", 160), b.get("pad_last_row", 0))
    names = [v for v in args.variants.split(",") if v]
    built, mem = {}, {}
    for name in names:
        change = dict(VARIANTS[name])
        donate = change.pop("_donate", True)
        unroll = change.pop("_unroll", False)
        optimizer = change.pop("_optimizer", "guarded")
        cfg = dataclasses.replace(base, **change)
        from qilin_jax.models.common import unrolled_scans

        with unrolled_scans() if unroll else contextlib.nullcontext():
            compiled, state, frozen, gb = build(cfg, batch, args.stage, donate, optimizer)
        m = compiled.memory_analysis()
        mem[name] = {
            "temp_mb": round(m.temp_size_in_bytes / 2**20, 1),
            "argument_mb": round(m.argument_size_in_bytes / 2**20, 1),
            "output_mb": round(m.output_size_in_bytes / 2**20, 1),
            "alias_mb": round(m.alias_size_in_bytes / 2**20, 1),
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
    med = {n: statistics.median(v) for n, v in times.items()}
    base_t = med.get("baseline", next(iter(med.values())))
    out = {
        "config": str(Path(args.config).relative_to(ROOT)) if args.config.startswith(str(ROOT)) else args.config,
        "platform": plat,
        "stage": args.stage,
        "repeats": args.repeats,
        "baseline": {
            k: getattr(base, k) for k in ("dtype", "attention", "remat", "loss_chunk", "loss_supervised_only")
        },
        "variants": {
            n: {"step_s": round(med[n], 4), "vs_baseline": round(med[n] / base_t, 3), **mem[n]} for n in names
        },
    }
    print(json.dumps(out))
    print("; ".join(f"{n}: {med[n]:.3f}s ({med[n] / base_t:.2f}x) temp {mem[n]['temp_mb']:.0f} MB" for n in names))


if __name__ == "__main__":
    main()
