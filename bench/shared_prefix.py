"""Benchmark: `train.shared_prefix` on a run config's stages, whole rows vs the preamble once.

    python bench/shared_prefix.py [--config configs/demo.yaml] [--stages stage1,stage2]
                                  [--repeats 6] [--steps 3]

For each stage: one real batch from the stage's loader, our jitted, donated train step
compiled twice, on the whole rows and on the batch cut by `split_shared_prefix` (the
template's preamble as `prefix_ids`, computed once). Both start from the same random
parameters; they alternate `--repeats` times, `--steps` steps each, and the median step
time of each is reported with their ratio, and the losses of both (they must agree: the
prefix path is exact). Stages whose template has no preamble worth sharing ("plain") or
whose first batch does not fit are reported as skipped. Prints one JSON line and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure_stage(cfg, stage, tokenizer, mesh, rules, parts, params, repeats: int, steps: int) -> dict:
    import jax

    from qilin_jax import sharding as S
    from qilin_jax.data.pipeline import make_loader
    from qilin_jax.train.distributed import batch_shardings, global_shape_example, to_global
    from qilin_jax.train.optim import make_optimizer
    from qilin_jax.train.shared_prefix import split_shared_prefix, stage_shared_prefix
    from qilin_jax.train.state import init_stage_state
    from qilin_jax.train.step import compile_train_step, stack_micro

    data_cfg = cfg.stage_data(stage)
    data_cfg.num_epochs = None
    prefix = stage_shared_prefix(cfg, data_cfg, tokenizer, parts.config)
    if prefix is None:
        return {"skipped": f"no shared preamble (template {data_cfg.template!r}, packing {data_cfg.packing})"}
    loader = make_loader(data_cfg, tokenizer)
    try:
        local = next(loader)
    finally:
        loader.close()
    shared = split_shared_prefix(local, prefix)
    if shared is None:
        return {"skipped": "the first batch does not start with the preamble in every row"}
    tx, schedule = make_optimizer(stage, 1000)
    built = {}
    for name, batch in (("whole", local), ("shared", shared)):
        micro = stack_micro(batch, 1)
        state, frozen, state_sh, f_sh = init_stage_state(parts, params, stage.trainable, tx, mesh)
        b_sh = batch_shardings(mesh, rules, global_shape_example(micro))
        fn = compile_train_step(
            parts.graphdef, tx, schedule, state_shardings=state_sh, frozen_shardings=f_sh, batch_shardings=b_sh
        )
        gb = to_global(micro, b_sh)
        with S.activation_sharding(mesh, rules):
            state, m = fn(state, frozen, gb)  # compile + first step: its loss is compared
        built[name] = [fn, state, frozen, gb, float(m["loss"])]
    times = {n: [] for n in built}
    for _ in range(repeats):
        for n, b in built.items():
            fn, state, frozen, gb, _ = b
            t = time.perf_counter()
            with S.activation_sharding(mesh, rules):
                for _ in range(steps):
                    state, m = fn(state, frozen, gb)
            jax.block_until_ready((state, m))
            times[n].append((time.perf_counter() - t) / steps)
            b[1] = state
    med = {n: statistics.median(v) for n, v in times.items()}
    B, T = local["input_ids"].shape
    return {
        "rows": B,
        "row_tokens": T,
        "prefix_tokens": len(prefix),
        "rows_after_cut": T - len(prefix),
        "whole_step_s": round(med["whole"], 4),
        "shared_step_s": round(med["shared"], 4),
        "shared_over_whole": round(med["shared"] / med["whole"], 3),
        "first_loss_whole": built["whole"][4],
        "first_loss_shared": built["shared"][4],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--stages", default=None, help="comma-separated stage names (default: all)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    args = ap.parse_args(argv)

    import jax

    from qilin_jax.config import load_config
    from qilin_jax.runtime import load_tokenizer
    from qilin_jax.train.distributed import build_mesh
    from qilin_jax.train.state import init_params, model_parts, resolve_model_config

    cfg = load_config(args.config, ["train.shared_prefix=true", *args.override])
    names = [s.name for s in cfg.stages]
    wanted = names if not args.stages else [s for s in args.stages.split(",") if s]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; the config has {names}")
    tokenizer = load_tokenizer(cfg)
    mesh, rules = build_mesh(cfg)
    parts = model_parts(resolve_model_config(cfg), mesh, rules)
    params = init_params(parts, cfg.seed, None, mesh, rules)
    stages = {}
    for stage in cfg.stages:
        if stage.name in wanted:
            stages[stage.name] = measure_stage(
                cfg, stage, tokenizer, mesh, rules, parts, params, args.repeats, args.steps
            )
    out = {
        "config": args.config,
        "platform": jax.default_backend(),
        "repeats": args.repeats,
        "steps": args.steps,
        "stages": stages,
    }
    print(json.dumps(out))
    print(
        "; ".join(
            f"{n}: skipped ({r['skipped']})"
            if "skipped" in r
            else f"{n}: {r['row_tokens']}-token rows, {r['prefix_tokens']} shared: {r['whole_step_s']:.3f} -> "
            f"{r['shared_step_s']:.3f} s ({r['shared_over_whole']:.2f}x)"
            for n, r in stages.items()
        )
    )


if __name__ == "__main__":
    main()
