"""Benchmark: the optimizer part of a train step alone, `GuardedAdamW` (train/optim.py) vs the
plain optax chain with the step's keep-selects after it, side by side in one process.

    python bench/optimizer.py [--config configs/bench/cpu.yaml] [--stage stage2] [--repeats 9]

Both run what `train_step` runs after the gradients (`train.step.apply_gradients` after the
division by the supervised-token count): the global norm, the non-finite verdict, clipping, AdamW with the warmup-cosine
schedule, and keeping the old state where the step is not finite; over the stage's trainable
parameters of the bench config's model, jitted with the state donated as in the loop.
Reported: time per update (median of interleaved repeats), its ratio, the compiled programs'
temporaries and how many whole-array copies each makes, and whether both give the same
parameters (they must: bit for bit). Prints one JSON line and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# A copy instruction of a non-scalar array in the compiled HLO text.
WHOLE_ARRAY_COPY = re.compile(r"= \w+\[[^\]]+\]\S* copy\(")


def make_update(tx, guarded: bool):
    """The optimizer half of train.step.train_step (`apply_gradients` after the division by the
    token count), with `tx` (a GuardedAdamW) or its plain optax chain, state donated."""
    import jax
    import jax.numpy as jnp

    from qilin_jax.train.step import apply_gradients

    def update(state, grads_sum, n):
        params, opt = state
        grads = jax.tree.map(lambda g: g / n, grads_sum)
        new_params, new_opt, _, _ = apply_gradients(
            tx if guarded else tx.reference, params, opt, grads, jnp.float32(0.0)
        )
        return new_params, new_opt

    return jax.jit(update, donate_argnums=(0,))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench/cpu.yaml"))
    ap.add_argument("--stage", default="stage2", choices=["stage1", "stage2"])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from bench.train_step import STAGES, load_bench_config
    from qilin_jax.config import StageConfig
    from qilin_jax.models.qilin import QilinMedVL
    from qilin_jax.train.optim import make_optimizer, partition, trainable_mask

    cfg, _ = load_bench_config(args.config, jax.default_backend())
    from flax import nnx

    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: QilinMedVL(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    trainable, _ = partition(shapes, trainable_mask(shapes, STAGES[args.stage]))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(leaves))
    params = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) * 0.02 for k, x in zip(keys, leaves)])
    grads = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys[len(leaves) :], leaves)])
    n = jax.numpy.float32(280.0)
    stage = StageConfig(name=args.stage, trainable=STAGES[args.stage], learning_rate=1e-5, warmup_ratio=0.0)
    tx, _ = make_optimizer(stage, 1000)

    sides, states, mem = {}, {}, {}
    for name, guarded in (("guarded", True), ("reference", False)):
        fn = make_update(tx, guarded)
        state = (jax.tree.map(lambda x: x + 0, params), tx.init(params))
        compiled = fn.lower(state, grads, n).compile()
        text = compiled.as_text()
        m = compiled.memory_analysis()
        mem[name] = {"temp_mb": round(m.temp_size_in_bytes / 2**20, 1), "copies": len(WHOLE_ARRAY_COPY.findall(text))}
        state = compiled(state, grads, n)  # warm-up
        jax.block_until_ready(state)
        sides[name], states[name] = compiled, state
    times = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, compiled in sides.items():
            t = time.perf_counter()
            states[name] = compiled(states[name], grads, n)
            jax.block_until_ready(states[name])
            times[name].append(time.perf_counter() - t)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(states["guarded"]), jax.tree.leaves(states["reference"]))
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    config = Path(args.config).resolve()
    out = {
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config,
        "platform": jax.default_backend(),
        "stage": args.stage,
        "trainable_params": n_params,
        "repeats": args.repeats,
        "guarded_s": round(med["guarded"], 6),
        "reference_s": round(med["reference"], 6),
        "guarded_over_reference": round(med["guarded"] / med["reference"], 3),
        "memory": mem,
        "same_result": same,
    }
    print(json.dumps(out))
    print(
        f"optimizer update, {n_params / 1e6:.1f} M trainable ({args.stage}): guarded {med['guarded'] * 1e3:.1f} ms, "
        f"optax chain + selects {med['reference'] * 1e3:.1f} ms ({out['guarded_over_reference']:.2f}x); "
        f"temp {mem['guarded']['temp_mb']:.0f} vs {mem['reference']['temp_mb']:.0f} MB; "
        f"copies {mem['guarded']['copies']} vs {mem['reference']['copies']}; same result: {same}"
    )


if __name__ == "__main__":
    main()
