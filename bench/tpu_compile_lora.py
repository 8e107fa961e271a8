"""TPU memory of the 13B on small slices, compiled for real TPU topologies on this CPU machine
(libtpu's compiler, as bench/tpu_compile.py): quantized decoding on one v5e chip, and the
QLoRA / LoRA stage-2 train step against bf16 full fine-tuning.

    python bench/tpu_compile_lora.py [--programs decode,qlora,lora,full] [--kinds bf16,int8,nf4]
        [--decode-target v5e-1] [--train-targets v5e-1,v5e-4,v5e-8,v4-8] [--rank 128]
        [--batch 1] [--slots 2560] [--seq 2048] [--rows-per-chip 1] [--out FILE.jsonl]

Nothing is allocated: parameters (with the quantized codes and scales of models/quant.py and
the adapters of models/lora.py), optimizer state and batches are jax.ShapeDtypeStructs with
our sharding rules; `jit(...).lower(...).compile()` targets the topology's devices. One v5e
chip is one device of a v5e 2x2 topology (libtpu has no 1x1 v5e layout; the program is the
same). Per-chip memory from `compiled.memory_analysis()` (arguments + outputs - aliased +
temporaries + code) against the chip's HBM; a program the compiler refuses reports its
RESOURCE_EXHAUSTED verdict.

decode: one KV-cache decode step of --batch rows against --slots bf16 cache slots, bf16
compute; the LLM's matrices as --kinds (bf16 = unquantized), everything else bf16.
qlora / lora: stage 2 with adapters of --rank on every decoder matrix plus the projector
trained in full (LLaVA's LoRA recipe), the LLM frozen as NF4 (qlora) or bf16 (lora), the
other frozen parameters bf16, trained ones float32 with AdamW state; seq --seq, full remat,
splash attention, chunked CE, global batch 128 by gradient accumulation over micro-batches
of --rows-per-chip rows per chip; fsdp over the chips. full: bench/tpu_compile.py's bf16 full
stage 2 (float32 master weights and AdamW state) on the same targets.
Prints one JSON line per compile (also to --out) and a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no chip is opened

from bench import tpu_compile as T  # noqa: E402 (after the environment set-up)

GB = T.GB
# name: (topology, chips used, HBM bytes per chip); "-1": one chip of the topology.
TARGETS = {**T.TARGETS, "v5e-1": ("v5e:2x2", 1, 16e9), "v5e-4": ("v5e:2x2", 4, 16e9), "v5e-8": ("v5e:2x4", 8, 16e9)}
GLOBAL_BATCH = 128


def _devices(target: str):
    topo, chips, _ = TARGETS[target]
    devs = T.topology_devices(topo)
    return devs[:chips] if chips < len(devs) else devs


def _hbm(target: str, devices) -> float:
    _, chips, hbm = TARGETS[target]
    return hbm * chips / len(devices)


def quantized_parts(cfg, mesh, rules, kind: str | None, lora=None):
    """ModelParts with the LLM's matrices as `kind` (None: float) and optional adapters."""
    import jax

    from qilin_jax.models import quant as Q
    from qilin_jax.train.lora import lora_parts
    from qilin_jax.train.state import model_parts

    parts = model_parts(cfg, mesh, rules)
    shapes = jax.eval_shape(lambda p: Q.quantize_params(p, kind), parts.abstract)["llm"]["layers"] if kind else {}
    if not kind and lora is None:
        return parts
    return lora_parts(parts, lora, mesh, rules, shapes)


def _as_dtype(abstract, dt, keep=lambda path: False):
    """Float32 leaves as `dt` (integer codes, quantization scales and `keep` paths as they are)."""
    import jax
    import jax.numpy as jnp

    from qilin_jax.models.quant import SCALE
    from qilin_jax.train.optim import path_str

    def one(path, x):
        p = path_str(path)
        if x.dtype != jnp.float32 or p.endswith(SCALE) or keep(p):
            return x
        return jax.ShapeDtypeStruct(x.shape, dt)

    return jax.tree_util.tree_map_with_path(one, abstract)


def compile_decode(target: str, kind: str, *, batch: int, slots: int) -> dict:
    """Compile one decode step of the 13B with the LLM's matrices as `kind` on a target."""
    import jax.numpy as jnp

    from qilin_jax.infer.sharded import INFERENCE_RULES

    devices = _devices(target)
    hbm = _hbm(target, devices)
    n = len(devices)
    cfg = dataclasses.replace(T.model_config(), remat="none")
    mesh = T.decode_mesh(cfg, devices)
    rules = INFERENCE_RULES
    parts = quantized_parts(cfg, mesh, rules, None if kind == "bf16" else kind)
    params = _as_dtype(parts.abstract, jnp.bfloat16)
    t0 = time.perf_counter()
    lowered, kv_shape = T.lower_decode(parts, params, mesh, rules, batch=batch, slots=slots)
    head = {
        "target": target,
        "chips": n,
        "program": "decode",
        "quantize": kind,
        "mesh": dict(mesh.shape),
        "batch": batch,
        "slots": slots,
        "weights_gb": round(T.per_chip_bytes(params, parts.shardings) / GB, 3),
        "kv_cache_gb": round(2 * jnp.dtype(jnp.bfloat16).itemsize * int(jnp.prod(jnp.array(kv_shape))) / n / GB, 3),
    }
    try:
        compiled = lowered.compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**head, "compile_s": round(time.perf_counter() - t0, 1), **T._oom_error(e, hbm)}
    return {**head, "compile_s": round(time.perf_counter() - t0, 1), **T._memory(compiled, hbm)}


def compile_lora_step(target: str, kind: str | None, *, rank: int, seq: int, rows_per_chip: int) -> dict:
    """Compile the LoRA (kind None) or QLoRA stage-2 step of the 13B on a target."""
    import jax
    import jax.numpy as jnp

    from qilin_jax import sharding as S
    from qilin_jax.config import LoraConfig, StageConfig
    from qilin_jax.models import lora as LM
    from qilin_jax.train.distributed import batch_shardings
    from qilin_jax.train.optim import make_optimizer, partition, trainable_mask
    from qilin_jax.train.state import train_state_shardings
    from qilin_jax.train.step import compile_train_step, init_state

    devices = _devices(target)
    hbm = _hbm(target, devices)
    n = len(devices)
    mesh = S.make_mesh(1, n, 1, devices=devices)
    rules = S.DEFAULT_RULES
    cfg = T.model_config()
    lc = LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.05, trainable_learning_rate=2e-5)
    parts = quantized_parts(cfg, mesh, rules, kind, lc)
    patterns = LM.trainable_patterns() + ["adapter/.*"]
    mask = trainable_mask(parts.abstract, patterns)
    abstract = _as_dtype(parts.abstract, jnp.bfloat16)  # the frozen base in the compute dtype
    t_abs, _ = partition(parts.abstract, mask)  # trained: float32 master weights
    _, f_abs = partition(abstract, mask)
    t_sh, f_sh = partition(parts.shardings, mask)
    stage = StageConfig(name="stage2", trainable=["adapter/.*"], learning_rate=2e-4, lora=True)
    tx, schedule = make_optimizer(stage, 1000, [("adapter/.*", 0.1)])
    state_abs = jax.eval_shape(lambda t: init_state(t, tx), t_abs)
    state_sh = train_state_shardings(state_abs.opt_state, t_sh, mesh)
    rows = rows_per_chip * n
    accum = max(1, GLOBAL_BATCH // rows)
    batch = T.abstract_batch(cfg, accum, rows, seq)
    b_sh = batch_shardings(mesh, rules, batch)
    step = compile_train_step(
        parts.graphdef,
        tx,
        schedule,
        state_shardings=state_sh,
        frozen_shardings=f_sh,
        batch_shardings=b_sh,
        packed=True,
        lora_dropout=lc.dropout,
    )
    n_lora = sum(int(x.size) for x in jax.tree.leaves(t_abs["llm"]))
    head = {
        "target": target,
        "chips": n,
        "program": "qlora" if kind else "lora",
        "quantize": kind or "bf16",
        "rank": rank,
        "lora_params_m": round(n_lora / 1e6, 1),
        "mesh": dict(mesh.shape),
        "rows_per_micro": rows,
        "accum": accum,
        "global_batch": rows * accum,
        "seq": seq,
        "argument_gb_precheck": round(T.per_chip_bytes((state_abs, f_abs, batch), (state_sh, f_sh, b_sh)) / GB, 3),
    }
    t0 = time.perf_counter()
    with S.activation_sharding(mesh, rules):
        lowered = step.lower(state_abs, f_abs, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**head, "compile_s": round(time.perf_counter() - t0, 1), **T._oom_error(e, hbm)}
    return {**head, "compile_s": round(time.perf_counter() - t0, 1), **T._memory(compiled, hbm)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", default="decode,qlora,lora,full")
    ap.add_argument("--kinds", default="bf16,int8,nf4")
    ap.add_argument("--decode-target", default="v5e-1")
    ap.add_argument("--train-targets", default="v5e-1,v5e-4,v5e-8,v4-8")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--slots", type=int, default=2560)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows-per-chip", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    programs = args.programs.split(",")
    rows = []

    def emit(r):
        rows.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if "decode" in programs:
        for kind in args.kinds.split(","):
            emit(compile_decode(args.decode_target, kind, batch=args.batch, slots=args.slots))
    for target in args.train_targets.split(","):
        if "qlora" in programs:
            emit(compile_lora_step(target, "nf4", rank=args.rank, seq=args.seq, rows_per_chip=args.rows_per_chip))
        if "lora" in programs:
            emit(compile_lora_step(target, None, rank=args.rank, seq=args.seq, rows_per_chip=args.rows_per_chip))
        if "full" in programs and target in T.TARGETS:
            emit(T.compile_train(target, "stage2", seq=args.seq))
    print("program  target  quantize  per-chip GB / HBM  fits")
    for r in rows:
        total = r.get("total_gb", r.get("temp_gb_required"))
        print(
            f"{r['program']:7s} {r['target']:7s} {r.get('quantize', 'bf16')!s:8s} "
            f"{total if total is not None else '-'} / {r.get('hbm_gb')}  {r.get('fits')}"
        )


if __name__ == "__main__":
    main()
