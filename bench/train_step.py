"""Benchmark: one training step of Qilin-Med-VL in our JAX code and in transformers' PyTorch
LlavaForConditionalGeneration + torch AdamW, stage 1 (adapter trains) and stage 2 (LLM +
adapter train; vision frozen on both), same model config and batch, run alternately in one
process, with MFU against a matmul peak measured in the same run on the same device.

    python bench/train_step.py [--config configs/bench/cpu.yaml] [--repeats 5]
                               [--frameworks jax,torch] [--settings gpu] [--override attention=xla]

Method: both frameworks are built and warmed up (our compile and torch's first-call costs
excluded), then each repeat runs jax stage 1, torch stage 1, jax stage 2, torch stage 2 and a
large matmul in each framework after each stage (4096^3 float32 on CPU, ~1-3 s like a step;
8192^3 bfloat16 on GPU); every figure is the median over repeats. Each step is a full
optimizer update: forward, backward over the stage's trainable parameters, global-norm
clipping (1.0), AdamW, and (ours) the warmup-cosine schedule and the non-finite guard. MFU =
step_flops (qilin_jax/train/flops.py, the formula the training loop logs) / step time /
measured matmul peak; our step is credited with the LM head only on the positions it computes
(the supervised ones when `loss_supervised_only` is on; `mfu_all_positions` is the usual
every-position formula), torch's with every position (it computes them all).

Compute settings come from the config's `platform:` section by jax's default backend (GPU:
bfloat16, cuDNN flash attention, full remat, chunked cross-entropy; torch gets bf16 autocast,
SDPA and gradient checkpointing to match). On CPU each side runs its fastest setting: ours
with full remat, a 256-token CE chunk, the LM head on supervised positions only and the
causal-block XLA attention (bench/train_variants.py), torch without gradient checkpointing.
Prints one JSON line (contract keys: stage1_step_s, stage2_step_s, torch_stage2_step_s,
stage2_speedup_vs_torch, mfu) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Both frameworks share one GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

STAGES = {
    "stage1": ["adapter/.*"],
    "stage2": ["llm/.*", "adapter/.*"],
}


def load_bench_config(path: str, plat: str, overrides: dict | None = None):
    """(QilinConfig with the platform's compute settings and `overrides`, the raw bench dict).

    The preset, `model.overrides`, `platform.<plat>` and `overrides` are merged by the run
    config's rule and parsed by its parser (qilin_jax.models.configs.with_overrides), so an
    unknown or mistyped setting is an error naming its key."""
    from qilin_jax.config import ConfigError, load_yaml
    from qilin_jax.models.configs import from_preset, with_overrides

    raw = load_yaml(path)
    m = raw["model"]
    platforms = raw.get("platform", {})
    if platforms and plat not in platforms:
        raise SystemExit(f"{path}: no `platform: {plat}:` settings (has: {', '.join(platforms)})")
    try:
        cfg = from_preset(m.get("preset", "qilin_med_vl_13b"), m.get("overrides"), where="model.overrides")
        cfg = with_overrides(cfg, platforms.get(plat, {}), where=f"platform.{plat}")
        cfg = with_overrides(cfg, overrides, where="override")
    except ConfigError as e:
        raise SystemExit(f"{path}: unknown compute setting or wrong value for platform {plat!r}: {e}") from None
    return cfg, raw


def parse_overrides(items) -> dict:
    """`key=value` pairs (YAML-typed values, dotted keys such as text.num_hidden_layers=2) from
    --override, as a mapping (the run config's override syntax)."""
    from qilin_jax.config import ConfigError, apply_overrides

    for item in items or []:
        if "=" not in item or item.startswith("="):
            raise SystemExit(f"--override {item!r}: expected key=value, e.g. attention=xla")
    try:
        return apply_overrides({}, list(items or []))
    except ConfigError as e:
        raise SystemExit(f"--override: {e}") from None


def make_batch(cfg, rows: int, text_tokens: int, pad_last_row: int, seed: int = 0) -> dict:
    """A stage-2-shaped batch: BOS, 576 image tokens, text; labels on the text only."""
    rng = np.random.default_rng(seed)
    P, img = cfg.image_tokens, cfg.image_token_id
    T = 1 + P + text_tokens
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(rows, T)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + P] = img
    mask = np.ones((rows, T), np.int32)
    if pad_last_row:
        mask[-1, T - pad_last_row :] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, : 1 + P] = -100
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    S = cfg.vision.image_size
    px = rng.normal(size=(rows, 1, 3, S, S)).astype(np.float32)
    return dict(input_ids=ids, labels=labels, segment_ids=mask, position_ids=pos, pixel_values=px)


# --- ours -------------------------------------------------------------------------------------


class JaxSide:
    """Our sharded jitted train step (one device), one donated TrainState per stage (`stages`:
    names of STAGES to build, all by default)."""

    def __init__(self, cfg, batch: dict, stages=tuple(STAGES)):
        import jax

        from qilin_jax import sharding as S
        from qilin_jax.config import StageConfig
        from qilin_jax.train.distributed import batch_shardings, to_global
        from qilin_jax.train.optim import make_optimizer, partition, trainable_mask
        from qilin_jax.train.state import init_params, model_parts, train_state_shardings
        from qilin_jax.train.step import compile_train_step, init_state

        self.jax = jax
        mesh = S.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.mesh, self.rules = mesh, S.DEFAULT_RULES
        parts = model_parts(cfg, mesh, self.rules)
        params = init_params(parts, 0, None, mesh, self.rules)
        micro = {k: v[None] for k, v in batch.items()}  # one micro-batch
        b_sh = batch_shardings(mesh, self.rules, micro)
        self.batch = to_global(micro, b_sh)
        self.steps, self.states, self.frozen, self.compile_s = {}, {}, {}, {}
        for name in stages:
            stage = StageConfig(name=name, trainable=STAGES[name], learning_rate=1e-5, warmup_ratio=0.0)
            mask = trainable_mask(params, stage.trainable)
            trainable, frozen = partition(params, mask)
            t_sh, f_sh = partition(parts.shardings, mask)
            tx, schedule = make_optimizer(stage, 1000)
            # Copy: the state is donated, and the parameters are shared by both stages.
            state = jax.jit(lambda t: init_state(jax.tree.map(lambda x: x + 0, t), tx))(trainable)  # noqa: B023 (called here)
            state_sh = train_state_shardings(state.opt_state, t_sh, mesh)
            state = jax.device_put(state, state_sh)
            step = compile_train_step(
                parts.graphdef, tx, schedule, state_shardings=state_sh, frozen_shardings=f_sh, batch_shardings=b_sh
            )
            t0 = time.perf_counter()
            with S.activation_sharding(mesh, self.rules):
                compiled = step.lower(state, frozen, self.batch).compile()
            self.compile_s[name] = time.perf_counter() - t0
            self.steps[name], self.states[name], self.frozen[name] = compiled, state, frozen
            self.run(name)  # warm-up

    def run(self, name: str) -> float:
        """One step; returns its loss (after the step finished on the device)."""
        state, m = self.steps[name](self.states[name], self.frozen[name], self.batch)
        self.jax.block_until_ready((state, m))
        self.states[name] = state
        return float(m["loss"])

    def matmul_peak(self, n: int, dtype: str, reps: int = 5) -> float:
        """FLOP/s of an n x n x n matmul (median of `reps`, each after the output is ready)."""
        jax = self.jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / statistics.median(times)


# --- transformers -----------------------------------------------------------------------------


class TorchSide:
    """transformers LlavaForConditionalGeneration + torch AdamW, frozen parts requires_grad=False."""

    def __init__(self, cfg, batch: dict, device: str):
        import torch
        import transformers

        from tests import torch_ref as R

        self.torch = torch
        self.device = device
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration(R.hf_llava_config(cfg))
        for sub in [model] + list(model.modules()):  # torch's fast attention path
            c = getattr(sub, "config", None)
            if c is not None and hasattr(c, "_attn_implementation"):
                c._attn_implementation = "sdpa"
        model = model.float().to(device).train()
        # Gradient checkpointing where memory needs it (GPU, as the release trains); on CPU
        # torch is fastest without it (recompute only costs it there), so it runs without.
        if cfg.remat != "none" and device.startswith("cuda"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.autocast = cfg.dtype != "float32"
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
        self.inputs = dict(
            input_ids=ids,
            attention_mask=torch.from_numpy(batch["segment_ids"].astype(np.int64)).to(device),
            labels=torch.from_numpy(batch["labels"].astype(np.int64)).to(device),
            pixel_values=torch.from_numpy(batch["pixel_values"][:, 0]).to(device),
        )
        named = dict(model.named_parameters())
        self.trainable = {
            "stage1": [p for k, p in named.items() if "multi_modal_projector" in k],
            "stage2": [
                p
                for k, p in named.items()
                if "multi_modal_projector" in k or "language_model" in k or k.startswith("lm_head")
            ],
        }
        self.opts = {
            s: torch.optim.AdamW(ps, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            for s, ps in self.trainable.items()
        }
        for s in STAGES:
            self.run(s)  # warm-up (and AdamW state allocation)

    def run(self, name: str) -> float:
        torch = self.torch
        train = {id(p) for p in self.trainable[name]}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in train)
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype or torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable[name], 1.0)
        opt.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    def matmul_peak(self, n: int, dtype: str, reps: int = 5) -> float:
        torch = self.torch
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        a = torch.randn(n, n, device=self.device).to(dt)
        b = torch.randn(n, n, device=self.device).to(dt)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        a @ b
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench/cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 4096 CPU, 8192 GPU)")
    ap.add_argument(
        "--settings",
        default=None,
        help="use this platform's compute settings of the config (default: jax's backend); "
        "e.g. --settings gpu --override attention=xla runs the GPU path (bf16, torch "
        "autocast) on a CPU",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one compute setting over the config's (dtype, attention, remat, loss_chunk, ...)",
    )
    args = ap.parse_args(argv)

    import jax

    plat = jax.default_backend()
    settings = args.settings or plat
    cfg, raw = load_bench_config(args.config, settings, parse_overrides(args.override))
    b = raw.get("batch", {})
    batch = make_batch(cfg, b.get("rows", 2), b.get("text_tokens", 160), b.get("pad_last_row", 0))
    B, T = batch["input_ids"].shape
    repeats = args.repeats or raw.get("repeats", 5)
    frameworks = [f for f in args.frameworks.split(",") if f]
    peak_dtype = cfg.dtype
    n = args.matmul_n or (4096 if plat == "cpu" else 8192)

    threads = os.cpu_count()
    sides = {}
    if "jax" in frameworks:
        sides["jax"] = JaxSide(cfg, batch)
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(threads)
        dev = "cuda" if plat == "gpu" and torch.cuda.is_available() else "cpu"
        sides["torch"] = TorchSide(cfg, batch, dev)

    times = {f"{who}_{s}": [] for who in sides for s in STAGES}
    peaks = {who: [] for who in sides}
    losses = {}
    for _ in range(repeats):  # A/B/A/B: the same noise for both
        for s in STAGES:
            for who, side in sides.items():
                t = time.perf_counter()
                losses[f"{who}_{s}"] = side.run(s)
                times[f"{who}_{s}"].append(time.perf_counter() - t)
            # The peak is sampled between the steps, one matmul of about a step's duration
            # each time, so it sees the same (shared-machine) conditions as the steps.
            for who, side in sides.items():
                peaks[who].append(side.matmul_peak(n, peak_dtype, reps=1))

    from qilin_jax.models.qilin import IGNORE_INDEX, param_count
    from qilin_jax.train.flops import device_peak_tflops, step_flops
    from qilin_jax.train.metrics import head_tokens

    med = {k: statistics.median(v) for k, v in times.items() if v}
    peak = {who: statistics.median(v) for who, v in peaks.items()}
    # Torch computes the LM head on every position (the usual formula); ours, with
    # loss_supervised_only, only on the supervised ones, and is credited only for those.
    flops_all = {s: step_flops(cfg, B, T, B, llm_trainable=(s == "stage2")) for s in STAGES}
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    flops = {
        s: step_flops(cfg, B, T, B, llm_trainable=(s == "stage2"), head_tokens=head_tokens(cfg, batch)) for s in STAGES
    }
    out = {
        "config": os.path.relpath(args.config, ROOT),
        "platform": plat,
        "settings": settings,
        "device": jax.devices()[0].device_kind,
        "host": platform.node(),
        "threads": threads,
        "jax": jax.__version__,
        "params": param_count(cfg)["total"],
        "dtype": cfg.dtype,
        "attention": cfg.attention,
        "remat": cfg.remat,
        "loss_chunk": cfg.loss_chunk,
        "loss_supervised_only": cfg.loss_supervised_only,
        "batch": B,
        "seq": T,
        "supervised_tokens": supervised,
        "repeats": repeats,
        "step_flops": {s: flops[s] for s in STAGES},
        "step_flops_all_positions": {s: flops_all[s] for s in STAGES},
        "matmul_peak_tflops": {who: round(p / 1e12, 4) for who, p in peak.items()},
        "matmul_n": n,
        "peak_dtype": peak_dtype,
    }
    vendor = device_peak_tflops(jax.devices()[0])
    if vendor:
        out["vendor_peak_tflops"] = vendor
    for who in sides:
        pre = "" if who == "jax" else "torch_"
        for s in STAGES:
            t = med[f"{who}_{s}"]
            out[f"{pre}{s}_step_s"] = round(t, 6)
            out[f"{pre}{s}_tokens_per_s"] = round(B * T / t, 1)
            out[f"{pre}{s}_mfu"] = round((flops if who == "jax" else flops_all)[s] / t / peak[who], 4)
            out[f"{pre}{s}_loss"] = round(losses[f"{who}_{s}"], 4)
    if "jax" in sides:
        out["mfu"] = out["stage2_mfu"]
        # The usual formula (LM head on every position), comparable with runs before
        # loss_supervised_only; it credits positions our step skips when that is on.
        out["mfu_all_positions"] = round(flops_all["stage2"] / med["jax_stage2"] / peak["jax"], 4)
        out["stage1_over_stage2"] = round(med["jax_stage1"] / med["jax_stage2"], 3)
        out["compile_s"] = {k: round(v, 2) for k, v in sides["jax"].compile_s.items()}
        if vendor:
            out["mfu_vs_vendor_peak"] = round(flops["stage2"] / med["jax_stage2"] / (vendor * 1e12), 4)
    if len(sides) == 2:
        for s in STAGES:
            out[f"{s}_speedup_vs_torch"] = round(med[f"torch_{s}"] / med[f"jax_{s}"], 3)
        out["torch_mfu"] = out["torch_stage2_mfu"]
    out["times_s"] = {k: [round(x, 6) for x in v] for k, v in times.items()}
    print(json.dumps(out))
    parts = [f"{plat} {out['device']}: seq {T} x {B}"]
    if "jax" in sides:
        parts.append(
            f"ours stage1 {out['stage1_step_s']:.3f}s stage2 {out['stage2_step_s']:.3f}s "
            f"(MFU {out['mfu']:.0%} of {peak['jax'] / 1e12:.3f} TFLOP/s measured)"
        )
    if "torch" in sides:
        parts.append(
            f"torch stage1 {out['torch_stage1_step_s']:.3f}s stage2 {out['torch_stage2_step_s']:.3f}s "
            f"(MFU {out['torch_stage2_mfu']:.0%})"
        )
    if len(sides) == 2:
        parts.append(
            f"stage2 speedup {out['stage2_speedup_vs_torch']:.2f}x, stage1 {out['stage1_speedup_vs_torch']:.2f}x"
        )
    print("; ".join(parts))


if __name__ == "__main__":
    main()
