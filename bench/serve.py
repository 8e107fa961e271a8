"""Benchmark: the continuous-batching engine (qilin_jax/serve) at concurrency 1, 4 and 16, and
the same 16 requests answered one by one by transformers' PyTorch `generate`, side by side in
one run, on the medium bench model of bench/generate.py (same random weights on both sides).

    python bench/serve.py [--model medium] [--new-tokens 64] [--slots 16] [--repeats 2]
    python bench/serve.py --tiny            # seconds: the test preset, for tests/test_bench_serve.py

Each request: BOS, one image (64 image tokens for medium), --text-tokens random text ids;
greedy, `</s>` disabled so every answer is exactly --new-tokens tokens. At concurrency c, c
requests are submitted at once to the engine (whose decode step always runs all --slots
slots) and the wall time until the last one finishes is taken (best of --repeats, after a
warm-up round; every program is compiled before any measurement, as the server does before
/health turns 200). aggregate decode tokens/s = c * new tokens / wall time (prefills
included); time to first token = submit to first token, over every request of every round.
torch: the same 16 requests one after another with `LlavaForConditionalGeneration.generate`
(SDPA attention, float32; on a CPU the faster of 1 thread and all cores, as in
bench/generate.py; `--torch-device auto` puts torch on the GPU when jax runs on one, so both
sides share the device).

The compute floor: the model FLOPs of the 16 requests (`train/flops.generate_flops`: prefill at
the real prompt lengths, each decode step, the LM head) at the device's matmul rate measured in
the same run (`matmul_gflops`, the model's MLP shape): `compute_floor_s_c16`, the fastest any
implementation could answer them; `throughput_ratio_ceiling` = torch seconds / that floor, the
highest ratio any engine could reach against this run's torch; `compute_share_c16` = floor /
our wall time at concurrency 16 (how close to the device's arithmetic limit we run).

Prints one JSON line and a one-line summary. Contract keys: decode_tokens_per_s_c1,
decode_tokens_per_s_c4, decode_tokens_per_s_c16, ttft_p50_s, ttft_p95_s, scaling_16_vs_1,
throughput_ratio_vs_torch_sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 (after the sys.path line)


class IdsTokenizer:
    """What the engine needs of a tokenizer when answers are only counted: an eos id that never
    occurs (-1: every answer runs to its limit) and a decode that returns no text."""

    eos_token_id = -1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return ""


def build(name: str):
    """(jax model, torch model, config) with the same random weights."""
    import jax
    from flax import nnx

    from bench.generate import model_config
    from qilin_jax.models import QilinMedVL
    from tests import torch_ref as R

    cfg = model_config(name)
    tm = R.build("llava", cfg, seed=0)
    for sub in [tm] + list(tm.modules()):
        c = getattr(sub, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            c._attn_implementation = "sdpa"
    model = nnx.eval_shape(lambda: QilinMedVL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state))
    R.to_jax("llava", tm, model, cfg)
    return model, tm, cfg


def requests(cfg, n: int, text_tokens: int, seed: int = 0):
    """n (ids [T], pixel values [1, 3, S, S]) prompts: BOS, one image, text ids (lengths vary by +-25%)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = max(1, int(text_tokens * (0.75 + 0.5 * i / max(n - 1, 1))))
        ids = np.asarray(
            [1] + [cfg.image_token_id] * cfg.image_tokens + list(rng.integers(3, cfg.text.vocab_size - 1, k)), np.int32
        )
        S = cfg.vision.image_size
        out.append((ids, rng.normal(size=(1, 3, S, S)).astype(np.float32)))
    return out


def run_round(engine, reqs, new_tokens: int):
    """Submit every request at once; (wall seconds until the last finishes, TTFTs, finished requests)."""
    from qilin_jax.serve.engine import Request

    t0 = time.perf_counter()
    subs = [engine.submit(Request(ids, px, max_tokens=new_tokens)) for ids, px in reqs]
    for r in subs:
        r.done.wait()
    wall = time.perf_counter() - t0
    assert all(len(r.tokens) == new_tokens for r in subs), [len(r.tokens) for r in subs]
    return wall, [r.first_token_at - r.submitted for r in subs], subs


def torch_sequential(
    tm, reqs, new_tokens: int, threads: list[int], device: str = "cpu"
) -> tuple[int, float, list, dict]:
    """(thread count, seconds to answer the requests one by one with HF generate, their tokens,
    seconds of the first request by thread count): the thread count is the faster one on the
    first request (on a busy machine all-core torch can be many times slower than one thread)."""
    import torch

    def one(ids, px):
        t_ids = torch.from_numpy(ids[None].astype(np.int64)).to(device)
        with torch.inference_mode():
            return (
                tm.generate(
                    input_ids=t_ids,
                    attention_mask=torch.ones_like(t_ids),
                    pixel_values=torch.from_numpy(px).to(device),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )[0, len(ids) :]
                .cpu()
                .numpy()
            )

    default = torch.get_num_threads()
    probe = {}
    for n in threads:
        torch.set_num_threads(n)
        one(*reqs[0])  # warm-up
        t0 = time.perf_counter()
        one(*reqs[0])
        probe[n] = time.perf_counter() - t0
    best = min(probe, key=probe.get)
    torch.set_num_threads(best)
    t0 = time.perf_counter()
    toks = [one(ids, px) for ids, px in reqs]
    seconds = time.perf_counter() - t0
    torch.set_num_threads(default)
    return best, seconds, toks, probe


def matmul_gflops(cfg, dtype, rows: int = 512, repeats: int = 10) -> float:
    """The device's measured matmul rate in GFLOP/s: the best of `repeats` products of [rows,
    hidden] x [hidden, intermediate] (the model's MLP shape, its compute dtype)."""
    import jax
    import jax.numpy as jnp

    t = cfg.text
    a = jnp.ones((rows, t.hidden_size), dtype)
    b = jnp.ones((t.hidden_size, t.intermediate_size), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * t.hidden_size * t.intermediate_size / best / 1e9


def log(msg: str) -> None:
    """Progress on stderr (stdout is the JSON line and the summary)."""
    print(f"[bench/serve] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Resident memory of this process in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medium")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model, few tokens (for tests)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-threads", default="auto", help="comma-separated; auto = 1 and all cores")
    ap.add_argument("--torch-device", default="auto", help="cpu, cuda, or auto: cuda when jax runs on a GPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.new_tokens, args.text_tokens, args.repeats = "tiny", 8, 8, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    threads = (
        sorted({1, os.cpu_count() or 1})
        if args.torch_threads == "auto"
        else [int(x) for x in args.torch_threads.split(",")]
    )
    from qilin_jax.infer.generate import generate, prompt_length_bucket
    from qilin_jax.serve.engine import Engine, compile_count

    model, tm, cfg = build(args.model)
    torch_device = args.torch_device
    if torch_device == "auto":
        torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if torch_device != "cpu":
        tm.to(torch_device)
        threads = [torch.get_num_threads()]  # host threads do not bound a GPU's generate
    reqs = requests(cfg, 16, args.text_tokens)
    longest = max(len(ids) for ids, _ in reqs)
    max_len = 1 << (longest + args.new_tokens - 1).bit_length()
    engine = Engine(
        model,
        IdsTokenizer(cfg.text.vocab_size),
        slots=args.slots,
        max_len=max_len,
        # The server's default buckets (prompt_length_bucket), only those these prompts use.
        prompt_buckets=sorted({prompt_length_bucket(len(ids)) for ids, _ in reqs}),
        max_queue=64,
    )
    rss0 = rss_mb()
    t0 = time.perf_counter()
    log(f"warm-up: buckets {engine.buckets}, windows {engine.windows}")
    engine.start()
    warmup_s = time.perf_counter() - t0
    compiles = compile_count()

    results, ttfts = {}, []
    first = None
    for c in (1, 4, 16):
        log(f"concurrency {c}")
        batch = reqs[:c]
        run_round(engine, batch, args.new_tokens)  # warm-up round (allocator, caches)
        best = None
        for _ in range(args.repeats):
            wall, tt, subs = run_round(engine, batch, args.new_tokens)
            ttfts += tt
            best = wall if best is None else min(best, wall)
            if c == 16:
                first = subs
        results[c] = {"wall_s": best, "tokens_per_s": c * args.new_tokens / best}
    compiled_after_ready = compile_count() - compiles
    rss1 = rss_mb()

    # Correctness on the side: greedy answers equal to generate's (the first 4 requests).
    agree = []
    for (ids, px), r in zip(reqs[:4], first[:4]):
        ref = generate(model, ids[None], px, max_new_tokens=args.new_tokens, eos_token_id=-1)[0]
        agree.append(bool((np.asarray(r.tokens) == ref).all()))

    log(f"ours done: {results}; torch one by one...")
    best_threads, torch_s, torch_toks, probe = torch_sequential(tm, reqs, args.new_tokens, threads, torch_device)
    torch_tps = 16 * args.new_tokens / torch_s
    torch_agree = float(np.mean([(np.asarray(r.tokens) == t).all() for r, t in zip(first, torch_toks)]))
    engine.stop()

    # The compute floor: the 16 requests' model FLOPs (train/flops.generate_flops, real prompt
    # lengths) at this device's measured matmul rate: no implementation answers them faster,
    # so torch_seconds / floor bounds the throughput ratio any engine can reach here.
    from qilin_jax.models.common import DTYPES
    from qilin_jax.train.flops import generate_flops

    flops16 = sum(generate_flops(cfg, len(ids), args.new_tokens, 1) for ids, _ in reqs)
    gflops = matmul_gflops(cfg, DTYPES[cfg.dtype])
    floor_s = flops16 / (gflops * 1e9)

    tt = np.asarray(ttfts)
    res = {
        "bench": "serve",
        "model": args.model,
        "slots": args.slots,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [int(min(len(i) for i, _ in reqs)), int(longest)],
        "max_len": max_len,
        "decode_tokens_per_s_c1": round(results[1]["tokens_per_s"], 2),
        "decode_tokens_per_s_c4": round(results[4]["tokens_per_s"], 2),
        "decode_tokens_per_s_c16": round(results[16]["tokens_per_s"], 2),
        "ttft_p50_s": round(float(np.percentile(tt, 50)), 4),
        "ttft_p95_s": round(float(np.percentile(tt, 95)), 4),
        "scaling_16_vs_1": round(results[16]["tokens_per_s"] / results[1]["tokens_per_s"], 3),
        "torch_sequential_tokens_per_s": round(torch_tps, 2),
        "throughput_ratio_vs_torch_sequential": round(results[16]["tokens_per_s"] / torch_tps, 3),
        "flops_c16": float(f"{flops16:.4g}"),
        "matmul_gflops": float(f"{gflops:.4g}"),
        "compute_floor_s_c16": float(f"{floor_s:.4g}"),
        "throughput_ratio_ceiling": float(f"{torch_s / floor_s:.4g}"),
        "compute_share_c16": float(f"{floor_s / results[16]['wall_s']:.4g}"),
        "torch_device": torch_device,
        "torch_threads": best_threads,
        "torch_first_request_seconds_by_threads": {str(n): round(v, 3) for n, v in probe.items()},
        "torch_seconds": round(torch_s, 3),
        "wall_s": {str(c): round(v["wall_s"], 4) for c, v in results.items()},
        "greedy_equal_generate": agree,
        "greedy_equal_torch_rows": torch_agree,
        "warmup_s": round(warmup_s, 2),
        "compilations_after_ready": compiled_after_ready,
        "rss_mb": {"before_warmup": round(rss0, 1), "after": round(rss1, 1)},
        "device": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(res))
    print(
        f"serve {args.model}: {res['decode_tokens_per_s_c1']:.1f} / {res['decode_tokens_per_s_c4']:.1f} / "
        f"{res['decode_tokens_per_s_c16']:.1f} tok/s at concurrency 1 / 4 / 16 (x{res['scaling_16_vs_1']:.2f}); "
        f"torch one by one {torch_tps:.1f} tok/s (ours at 16: x{res['throughput_ratio_vs_torch_sequential']:.2f}); "
        f"TTFT p50 {res['ttft_p50_s'] * 1e3:.0f} ms, p95 {res['ttft_p95_s'] * 1e3:.0f} ms; "
        f"compute floor at {res['matmul_gflops']:.0f} GFLOP/s: ratio ceiling x{res['throughput_ratio_ceiling']:.2f}, "
        f"ours at {100 * res['compute_share_c16']:.0f}% of it; "
        f"{compiled_after_ready} compilations after warm-up"
    )


if __name__ == "__main__":
    main()
