"""The GPU suite: parity, train-step MFU, 13B decode and peak memory on one GPU, in one run
that writes one JSON file. Entry point: bench/gpu_suite.sh (same arguments).

    bench/gpu_suite.sh [--out PATH|DIR] [--dry-run] [--parts env,parity,train_step,decode,serve]
                       [--limit PART=SECONDS ...] [--budget-s 480]

Parts, in order, each in its own Python process with a time limit (a part that fails or runs
out of time records its error and the suite goes on; the JSON is rewritten after every part):
  env         versions (jax, jaxlib, flax, optax, orbax, torch, CUDA, cuDNN, transformers),
              device kind and memory; on a real run, fails unless jax's backend is the GPU.
  parity      bench/parity.py's `measure` on the device: our models vs transformers, float32
              at the highest matmul precision (torch float32 on the same GPU, TF32 off) with
              the limits of tests/test_models_parity.py, and the bf16 LLaVA logits (attention
              `auto`: the cuDNN flash kernel on a GPU) vs float32 torch, limit 2e-2. Every
              relative error is recorded as a number next to its limit.
  train_step  bench/train_step.py --config configs/bench/gpu_13b_wide.yaml: ours vs
              transformers + torch AdamW (bf16, SDPA), stage 1 and 2, its JSON as printed
              plus tokens/s and MFU against the device's dense bf16 peak:
                  MFU = step_flops / step seconds / (peak TFLOP/s * 1e12),
              step_flops from qilin_jax/train/flops.py (ours: the LM head on the positions it
              computes; torch: on every position, as train_step.py credits them).
  decode      bench/decode_13b.py: a LLaMA-2-13B decoder with random bf16 weights made on the
              device, tokens/s at batch 1 and 16 vs transformers `generate`, and the share of
              the HBM roofline: batch * BW / (weight bytes + KV-cache bytes read per step).
  serve       bench/serve.py on its medium model: the continuous-batching engine at concurrency
              1, 4 and 16 vs the same 16 requests answered one by one by transformers
              `generate`, torch on the same GPU (docs/serving.md).
Each part records its peak memory: jax `memory_stats()['peak_bytes_in_use']` of device 0,
torch `cuda.max_memory_allocated()` (null where the framework or CUDA is unused) and the
process's peak RSS.

--dry-run: every part at tiny sizes on the CPU (JAX_PLATFORMS=cpu; the train step on the GPU
settings with XLA attention, the decode on the `tiny` preset), the same JSON structure with
`"dry_run": true`; tests/test_gpu_suite.py runs it. Output: --out PATH (a .json file) or
DIR/<date>_<device>.json, DIR = --out or $OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# NVIDIA H200 SXM datasheet: 141 GB of HBM3e at 4.8 TB/s; dense BF16 tensor-core peak
# 989 TFLOP/s (the datasheet's 1,979 TFLOP/s assumes 2:4 structured sparsity). The same
# 989 is qilin_jax/train/flops.PEAK_TFLOPS["h200"] (tests/test_gpu_suite.py checks they agree).
H200_BF16_DENSE_TFLOPS = 989.0
H200_HBM_BYTES_PER_S = 4.8e12
H200_HBM_BYTES = 141e9
# HBM bandwidth by device kind (bench/decode_13b.py's roofline), vendor datasheets:
# H100 SXM 3.35 TB/s, A100 80GB SXM 2.039 TB/s.
HBM_BYTES_PER_S = {"h200": H200_HBM_BYTES_PER_S, "h100": 3.35e12, "a100": 2.039e12}

PARTS = ("env", "parity", "train_step", "decode", "serve")
# Seconds per part on the H200; they sum to 480 s, the suite's 8-minute budget.
LIMITS_S = {"env": 25, "parity": 55, "train_step": 165, "decode": 165, "serve": 70}
BUDGET_S = 480
# The dry run on a small shared CPU compiles slower than the GPU host: generous limits (its
# parts need ~1-2 CPU minutes in all, but wall time grows with the machine's load).
DRY_RUN_LIMITS_S = {"env": 120, "parity": 400, "train_step": 400, "decode": 400, "serve": 300}
DRY_RUN_BUDGET_S = 1500
# Parity limits of tests/test_models_parity.py (float32) and its bf16 case.
PARITY_LIMITS = {
    "clip_hidden_states_max_rel": 1e-5,
    "llama_logits_rel": 1e-5,
    "llama_loss_rel": 1e-4,
    "llama_grads_max_rel": 1e-4,
    "llava_logits_rel": 1e-4,
    "llava_loss_rel": 1e-4,
    "llava_grads_max_rel": 1e-4,
    "llava_bf16_logits_rel_vs_fp32_torch": 2e-2,
}
TRAIN_CONFIG = "configs/bench/gpu_13b_wide.yaml"
# The dry run's train step: the GPU config's settings on a model small enough for a CPU.
TINY_TRAIN_MODEL = {
    "preset": "qilin_med_vl_13b",
    "overrides": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        "text": {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,
        },
        "image_token_id": 511,
    },
}


def device_memory() -> dict:
    """Peak memory of this process: jax device 0, torch CUDA (None where unused) and host RSS."""
    out = {
        "jax_peak_bytes": None,
        "jax_bytes_limit": None,
        "torch_peak_bytes": None,
        "torch_peak_reserved_bytes": None,
        # ru_maxrss is in KiB on Linux
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if "jax" in sys.modules:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        out["jax_peak_bytes"] = stats.get("peak_bytes_in_use")
        out["jax_bytes_limit"] = stats.get("bytes_limit")
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            out["torch_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


# --- parts (each runs in a child process) -----------------------------------------------------


def _gpu_missing(dry_run: bool) -> str | None:
    """Why a real run cannot go on (jax's backend is not the GPU), or None."""
    import jax

    if dry_run or jax.default_backend() == "gpu":
        return None
    return (
        f"jax's backend is {jax.default_backend()!r}, not the GPU "
        f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}); use --dry-run on a CPU"
    )


def _require_gpu(dry_run: bool):
    why = _gpu_missing(dry_run)
    if why:
        raise RuntimeError(why)


def part_env(dry_run: bool, work: Path) -> dict:
    """Versions, device kind and memory (and nvidia-smi's view where it exists); on a real run
    without a GPU backend, the same with an error."""
    import importlib.util
    import platform

    import flax
    import jax
    import jaxlib
    import numpy
    import optax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    out = {
        "platform": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "device_memory_bytes": stats.get("bytes_limit"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "pytest_available": importlib.util.find_spec("pytest") is not None,
    }
    try:
        import orbax.checkpoint as ocp

        out["orbax_checkpoint"] = getattr(ocp, "__version__", "unknown")
    except ImportError as e:
        out["orbax_checkpoint"] = f"missing: {e}"
    import torch
    import transformers

    out.update(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        transformers=transformers.__version__,
        torch_cuda_available=torch.cuda.is_available(),
    )
    if torch.cuda.is_available():
        out["torch_device_name"] = torch.cuda.get_device_name(0)
        out["cudnn"] = torch.backends.cudnn.version()
    import shutil

    if shutil.which("nvidia-smi"):  # driver, clocks and power limit: what the figures ran under
        q = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        out["nvidia_smi"] = {"query": q, "output": (smi.stdout or smi.stderr).strip()}
    why = _gpu_missing(dry_run)
    if why:  # kept with the versions found: they say why
        out["errors"] = [why]
    return out


def part_parity(dry_run: bool, work: Path) -> dict:
    """bench/parity.py's errors with torch on the same device, each next to its test limit."""
    _require_gpu(dry_run)
    import jax
    import jax.numpy as jnp
    import torch

    from bench import parity as P
    from qilin_jax.models.attention import resolve_implementation

    torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    # The dry run checks one LLaMA variant (the GQA one): the code path, at a third of the compiles.
    errors: list[str] = []
    raw = P.measure(torch_device=torch_device, jit=True, variants=["gqa"] if dry_run else None, errors=errors)
    checks = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            family = "llava" if key == "llava" else "llama"
            for metric, err in value.items():
                checks[f"{key}_{metric}"] = (err, PARITY_LIMITS[f"{family}_{metric}"])
        else:
            checks[key] = (value, PARITY_LIMITS[key])
    # bench/parity.py sets "highest"; read back where this jax version exposes the flag
    precision = str(getattr(jax.config, "jax_default_matmul_precision", "highest (set by bench/parity.py)"))
    return {
        "torch_device": torch_device,
        "jax_matmul_precision": precision,
        "bf16_attention": resolve_implementation("auto", jnp.bfloat16, packed=False, decoding=False),
        "llama_variants": sorted(k[len("llama_") :] for k in raw if k.startswith("llama_")),
        "checks": {k: {"max_rel_err": e, "limit": lim, "ok": bool(e <= lim)} for k, (e, lim) in checks.items()},
        "all_within_limits": not errors and all(e <= lim for e, lim in checks.values()),
        "errors": errors,
    }


def _captured_json(fn, argv) -> tuple[dict | None, str]:
    """(the first JSON line fn(argv) printed, or its return value; everything it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ret = fn(argv)
    text = buf.getvalue()
    sys.stdout.write(text)  # into the part's log
    if isinstance(ret, dict):
        return ret, text
    for line in text.splitlines():
        if line.startswith("{"):
            return json.loads(line), text
    raise RuntimeError(f"no JSON line in the output: {text[-2000:]!r}")


def part_train_step(dry_run: bool, work: Path) -> dict:
    """bench/train_step.py's JSON plus MFU and tokens/s against the dense bf16 peak."""
    _require_gpu(dry_run)
    import jax
    import yaml

    from bench import train_step as T
    from qilin_jax.train.flops import device_peak_tflops

    if dry_run:
        raw = yaml.safe_load((ROOT / TRAIN_CONFIG).read_text())
        raw.update(model=TINY_TRAIN_MODEL, batch={"rows": 2, "text_tokens": 12, "pad_last_row": 3}, repeats=1)
        cfg_path = work / "train_step_tiny.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        # The GPU settings (bf16, torch autocast, full remat, chunked CE); cuDNN needs a GPU.
        argv = [
            "--config",
            str(cfg_path),
            "--settings",
            "gpu",
            "--override",
            "attention=xla",
            "--repeats",
            "1",
            "--matmul-n",
            "256",
        ]
    else:
        argv = ["--config", str(ROOT / TRAIN_CONFIG)]
    out, _ = _captured_json(T.main, argv)
    peak = device_peak_tflops(jax.devices()[0])
    source = "device kind (qilin_jax/train/flops.PEAK_TFLOPS)"
    if peak is None:  # the CPU dry run: the H200's figure, so the formula runs end to end
        peak, source = H200_BF16_DENSE_TFLOPS, "H200 SXM spec (nominal: no peak known for this device)"
    tokens = out["batch"] * out["seq"]
    vs_peak = {}
    for s in ("stage1", "stage2"):
        if f"{s}_step_s" in out:
            vs_peak[f"{s}_mfu"] = out["step_flops"][s] / out[f"{s}_step_s"] / (peak * 1e12)
            vs_peak[f"{s}_tokens_per_s"] = tokens / out[f"{s}_step_s"]
        if f"torch_{s}_step_s" in out:
            vs_peak[f"torch_{s}_mfu"] = out["step_flops_all_positions"][s] / out[f"torch_{s}_step_s"] / (peak * 1e12)
            vs_peak[f"torch_{s}_tokens_per_s"] = tokens / out[f"torch_{s}_step_s"]
    out["vs_peak"] = {"peak_tflops": peak, "peak_source": source, **{k: float(f"{v:.4g}") for k, v in vs_peak.items()}}
    return out


def part_decode(dry_run: bool, work: Path) -> dict:
    """bench/decode_13b.py's JSON: 13B (tiny in the dry run) decode vs transformers, roofline."""
    _require_gpu(dry_run)
    from bench import decode_13b as D

    argv = ["--partial", str(work / "decode.partial.json")]
    argv += (
        ["--size", "tiny", "--repeats", "3", "--min-seconds", "0.2", "--bandwidth-mb", "64"]
        if dry_run
        else ["--size", "13b", "--repeats", "2"]
    )
    return _captured_json(D.main, argv)[0]


def part_serve(dry_run: bool, work: Path) -> dict:
    """bench/serve.py's JSON: the serving engine at concurrency 1/4/16 vs torch one by one."""
    _require_gpu(dry_run)
    from bench import serve as S

    return _captured_json(S.main, ["--tiny"] if dry_run else ["--repeats", "2"])[0]


PART_FUNCS = {
    "env": part_env,
    "parity": part_parity,
    "train_step": part_train_step,
    "decode": part_decode,
    "serve": part_serve,
}
# Files a part leaves behind with what it finished before a timeout.
PARTIAL_FILES = {"decode": "decode.partial.json"}


def run_part(name: str, dry_run: bool, work: Path, out_file: Path) -> int:
    """Child mode: run one part, write {"result", "memory", "error", "traceback"} to out_file.
    A part raises when it cannot finish, or returns its result with a non-empty "errors" list
    when some of it failed (what finished is kept)."""
    rec = {"result": None, "memory": None, "error": None, "traceback": None}
    try:
        rec["result"] = PART_FUNCS[name](dry_run, work)
        if rec["result"].get("errors"):
            rec["error"] = "; ".join(rec["result"]["errors"])
    except BaseException as e:  # noqa: BLE001 (SystemExit from a bench's argument checks too)
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-6000:]
    try:
        rec["memory"] = device_memory()
    except Exception as e:  # noqa: BLE001
        rec["memory"] = {"error": f"{type(e).__name__}: {e}"}
    out_file.write_text(json.dumps(rec, default=str))
    return 0 if rec["error"] is None else 1


# --- the orchestrator (no jax/torch imports: each part gets a fresh process) ------------------


def _child_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax and torch share the GPU
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        # '' = jax picks the available accelerator (bench/parity.py would otherwise default to cpu).
        env.setdefault("JAX_PLATFORMS", "")
        # A rerun on the same machine skips the compiles of the first one.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/qilin_jax_compile_cache")
    return env


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _output_path(out: str, device_kind: str, dry_run: bool, started: datetime.datetime) -> Path:
    p = Path(out)
    if p.suffix == ".json":
        return p
    name = f"{started:%Y-%m-%d}_{_slug(device_kind)}{'_dry-run' if dry_run else ''}.json"
    return p / name


def _write(path: Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _summary(name: str, entry: dict) -> str:
    r = entry.get("result") or {}
    if entry.get("error"):
        return f"{name}: ERROR after {entry['wall_s']:.0f}s: {entry['error']}"
    bits = [f"{name}: ok in {entry['wall_s']:.0f}s ({entry['cpu_s']:.0f} CPU s)"]
    if name == "env":
        bits.append(f"{r.get('device_kind')} jax {r.get('jax')} torch {r.get('torch')}")
    elif name == "parity":
        worst = {k: v["max_rel_err"] for k, v in r.get("checks", {}).items()}
        bits.append(
            f"all within limits: {r.get('all_within_limits')}; bf16 attention {r.get('bf16_attention')}; "
            f"bf16 logits {worst.get('llava_bf16_logits_rel_vs_fp32_torch', float('nan')):.2e}"
        )
    elif name == "train_step":
        v = r.get("vs_peak", {})
        bits.append(
            f"stage2 MFU {100 * v.get('stage2_mfu', float('nan')):.3g}% (torch "
            f"{100 * v.get('torch_stage2_mfu', float('nan')):.3g}%) of {v.get('peak_tflops')} TFLOP/s, "
            f"speedup vs torch {r.get('stage2_speedup_vs_torch')}"
        )
    elif name == "decode":
        for b, row in r.get("batches", {}).items():
            bits.append(
                f"batch {b} {row.get('decode_tokens_per_s', float('nan')):.1f} tok/s "
                f"({100 * row.get('decode_fraction_of_roofline', float('nan')):.3g}% of roofline) vs torch "
                f"{row.get('torch_decode_tokens_per_s', float('nan')):.1f}"
            )
    elif name == "serve":
        bits.append(
            f"{r.get('decode_tokens_per_s_c1')} / {r.get('decode_tokens_per_s_c16')} tok/s at concurrency 1 / 16 "
            f"(x{r.get('scaling_16_vs_1')}), x{r.get('throughput_ratio_vs_torch_sequential')} vs torch one by one"
        )
    m = entry.get("memory") or {}
    peaks = [
        f"{k[: -len('_peak_bytes')]} {m[k] / 2**30:.1f} GiB"
        for k in ("jax_peak_bytes", "torch_peak_bytes")
        if isinstance(m.get(k), (int, float))
    ]
    if peaks:
        bits.append("peak " + ", ".join(peaks))
    return "; ".join(bits)


def run_suite(args) -> int:
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    limits = dict(DRY_RUN_LIMITS_S if args.dry_run else LIMITS_S)
    budget = args.budget_s or (DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S)
    for item in args.limit:
        k, sep, v = item.partition("=")
        if not sep or k not in PARTS:
            raise SystemExit(f"--limit {item!r}: expected PART=SECONDS with PART in {', '.join(PARTS)}")
        limits[k] = float(v)
    out_arg = args.out or os.environ.get("OUT")
    if not out_arg:
        raise SystemExit("no output: pass --out PATH|DIR or set $OUT")

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    env = _child_env(args.dry_run)
    data = {
        "suite": "bench/gpu_suite.sh",
        "dry_run": args.dry_run,
        "started_utc": started.isoformat(timespec="seconds"),
        "device_kind": None,
        "budget_s": budget,
        "spec": {
            "name": "NVIDIA H200 SXM",
            "bf16_dense_tflops": H200_BF16_DENSE_TFLOPS,
            "hbm_bytes_per_s": H200_HBM_BYTES_PER_S,
            "hbm_bytes": H200_HBM_BYTES,
        },
        "parts": {},
        "errors": [],
    }
    path = None
    for name in parts:
        left = budget - (time.monotonic() - t0)
        limit = min(limits[name], left - 2)
        entry = {
            "limit_s": round(limit, 1),
            "wall_s": 0.0,
            "cpu_s": 0.0,
            "returncode": None,
            "timed_out": False,
            "result": None,
            "memory": None,
            "error": None,
        }
        if limit < 5:
            entry["error"] = f"skipped: {left:.0f}s left of the suite's {budget:.0f}s budget"
        else:
            part_out = work / f"{name}.result.json"
            log = work / f"{name}.log"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--part",
                name,
                "--part-out",
                str(part_out),
                "--work",
                str(work),
            ] + (["--dry-run"] if args.dry_run else [])
            start = time.monotonic()
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(log, "wb") as lf:
                proc = subprocess.Popen(
                    cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
                )
                try:
                    entry["returncode"] = proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    entry["returncode"] = proc.wait()
                    entry["timed_out"] = True
            entry["wall_s"] = round(time.monotonic() - start, 2)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            entry["cpu_s"] = round(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, 2)
            if part_out.exists():
                rec = json.loads(part_out.read_text())
                entry.update(result=rec["result"], memory=rec["memory"], error=rec["error"])
                if rec.get("traceback"):
                    entry["traceback"] = rec["traceback"]
            elif entry["timed_out"]:
                entry["error"] = f"timed out after {limit:.0f}s"
                partial = work / PARTIAL_FILES.get(name, "-")
                if partial.exists():
                    entry["result"] = json.loads(partial.read_text())
                    entry["error"] += " (the figures finished before it are kept under result)"
            else:
                entry["error"] = f"the part's process exited with code {entry['returncode']} and no result"
            if entry["error"]:
                entry["log_tail"] = log.read_text(errors="replace")[-4000:]
        data["parts"][name] = entry
        if entry["error"]:
            data["errors"].append(name)
        if data["device_kind"] is None and entry["result"]:  # env's, or a bench's "device"
            data["device_kind"] = entry["result"].get("device_kind") or entry["result"].get("device")
        data["wall_s"] = round(time.monotonic() - t0, 2)
        path = path or _output_path(out_arg, data["device_kind"] or "unknown", args.dry_run, started)
        _write(path, data)
        print(_summary(name, entry), flush=True)
    print(
        f"gpu suite: {len(parts) - len(data['errors'])}/{len(parts)} parts ok in {data['wall_s']:.0f}s "
        f"(budget {budget:.0f}s); results: {path}",
        flush=True,
    )
    return 0 if not data["errors"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="a .json file, or a folder for <date>_<device>.json (default $OUT)")
    ap.add_argument(
        "--dry-run",
        "--tiny",
        dest="dry_run",
        action="store_true",
        help="every part at tiny sizes on the CPU (the rehearsal)",
    )
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help=f"a part's time limit (defaults {LIMITS_S})",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"the whole suite's time limit (default {BUDGET_S}; dry run {DRY_RUN_BUDGET_S})",
    )
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        sys.path.insert(0, str(ROOT))
        return run_part(args.part, args.dry_run, Path(args.work), Path(args.part_out))
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
