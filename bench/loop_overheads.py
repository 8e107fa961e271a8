"""Benchmark: what async checkpointing and deferred host syncs save in the training loop.

    python bench/loop_overheads.py [--config configs/bench/cpu_narrow.yaml] [--steps 12]
                                   [--save-every 4] [--repeats 2]

Our jitted, donated stage-2 train step of a bench config (the same step as bench/train_step.py)
runs `--steps` steps in a loop shaped like the training loop's: each step builds its batch on
the host (numpy, then `to_global`), dispatches the step, and saves a checkpoint (TrainState:
parameters + AdamW state, through `TrainCheckpointer`, Orbax) every `--save-every` steps;
the loop ends when the last save has finished. Variants, interleaved, median over repeats:

- `no_save`: the loop without checkpoints (the floor);
- `async_save`: `checkpoint.async_save: true` (the default): the loop blocks only while the
  arrays are copied off the device, Orbax writes in background threads;
- `sync_save`: `async_save: false`: the loop waits for every write;
- `sync_every_step`: no checkpoints, but the loss is fetched to the host after every step
  (`float(loss)`), as a loop that logs every step would; the default loop fetches metrics only
  at logging/checkpoint steps, so the host prepares the next batch while the device computes.

Reports wall time per variant, the checkpoint cost (variant - no_save) per save, and the
state's size. Prints one JSON line and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("no_save", "async_save", "sync_save", "sync_every_step")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench/cpu_narrow.yaml"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = ap.parse_args(argv)

    import jax

    from bench.train_step import JaxSide, load_bench_config, make_batch
    from qilin_jax.train.checkpointing import TrainCheckpointer
    from qilin_jax.train.distributed import to_global

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    plat = jax.default_backend()
    cfg, raw = load_bench_config(args.config, plat)
    b = raw.get("batch", {})
    shape = (b.get("rows", 2), b.get("text_tokens", 160), b.get("pad_last_row", 0))
    side = JaxSide(cfg, make_batch(cfg, *shape), stages=("stage2",))  # compiled and warmed up
    step, frozen = side.steps["stage2"], side.frozen["stage2"]
    shardings = jax.tree.map(lambda x: x.sharding, side.batch)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(side.states["stage2"]))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="qilin_bench_ckpt_"))

    def run(variant: str, rep: int) -> float:
        directory = root / f"{variant}_{rep}"
        ckpt = None
        if variant in ("async_save", "sync_save"):
            ckpt = TrainCheckpointer(str(directory), keep=1, async_save=(variant == "async_save"))
        t0 = time.perf_counter()
        for i in range(1, args.steps + 1):
            local = make_batch(cfg, *shape, seed=i)  # host work of the step, as the loop's loader
            gb = to_global({k: v[None] for k, v in local.items()}, shardings)
            side.states["stage2"], metrics = step(side.states["stage2"], frozen, gb)
            if variant == "sync_every_step":
                float(metrics["loss"])
            if ckpt is not None and i % args.save_every == 0:
                ckpt.save(i, side.states["stage2"], None)
        jax.block_until_ready(side.states["stage2"])
        if ckpt is not None:
            ckpt.close()  # waits for the last write
        dt = time.perf_counter() - t0
        shutil.rmtree(directory, ignore_errors=True)
        return dt

    times = {v: [] for v in variants}
    try:
        for rep in range(args.repeats):
            for v in variants:
                times[v].append(run(v, rep))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    saves = args.steps // args.save_every
    out = {
        "bench": "loop_overheads",
        "config": os.path.relpath(args.config, ROOT),
        "platform": plat,
        "steps": args.steps,
        "save_every": args.save_every,
        "saves": saves,
        "state_mb": round(state_bytes / 2**20, 1),
        "repeats": args.repeats,
        "seconds": {v: round(t, 3) for v, t in med.items()},
        "times_s": {v: [round(x, 3) for x in t] for v, t in times.items()},
    }
    if "no_save" in med:
        base = med["no_save"]
        out["step_s"] = round(base / args.steps, 4)
        for v in ("async_save", "sync_save"):
            if v in med and saves:
                out[f"{v}_cost_per_save_s"] = round((med[v] - base) / saves, 3)
        if "sync_every_step" in med:
            out["sync_every_step_cost_per_step_s"] = round((med["sync_every_step"] - base) / args.steps, 4)
    print(json.dumps(out))
    parts = [f"{v} {t:.2f}s" for v, t in med.items()]
    if "async_save_cost_per_save_s" in out and "sync_save_cost_per_save_s" in out:
        parts.append(
            f"per save of {out['state_mb']:.0f} MB: async {out['async_save_cost_per_save_s']:.2f}s, "
            f"sync {out['sync_save_cost_per_save_s']:.2f}s"
        )
    print(f"{args.steps} steps, {saves} saves: " + "; ".join(parts))


if __name__ == "__main__":
    main()
