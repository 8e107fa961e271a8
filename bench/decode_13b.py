"""Benchmark: KV-cache decoding of a full-size LLaMA-2-13B decoder (random bf16 weights), ours
vs transformers `LlamaForCausalLM.generate` on the same device, at batch 1 and 16, and the
share of the HBM bandwidth roofline each reaches.

    python bench/decode_13b.py [--size 13b|tiny] [--batches 1,16] [--prompt-tokens 128]
                               [--new-tokens 128] [--repeats 3] [--frameworks jax,torch]

Models: ours is `QilinMedVL` of the `qilin_med_vl_13b` preset (its decoder is LLaMA-2-13B:
hidden 5120, 40 layers, 40 heads, MLP 13824, vocab 32000), parameters and compute in bf16,
text-only prompts. Its weights are drawn on the device, one jitted init per parameter with
`out_shardings` on the device, in bf16 (normal(0.02); norms 1, biases 0 as the model's own
initialiser): nothing 13B-sized ever exists on the host. torch: `LlamaForCausalLM` of the
same shapes (tests/torch_ref.hf_text_config), built under `torch.device(<device>)` with bf16
as the default dtype (random init on the device), SDPA attention. `--size tiny` is the `tiny`
preset (GQA, 2 layers) for a CPU rehearsal.

Method (bench/generate.py's): greedy, eos disabled (exactly N new tokens on both sides), the
same random prompt of `--prompt-tokens` per row; the best time of generating 1 token (t1:
prefill + first token) and N tokens (tN), after a warm-up (our compile excluded).
decode tokens/s = batch * (N - 1) / (tN - t1); prefill tokens/s = batch * prompt / t1. Ours
runs `qilin_jax.infer.generate`'s compiled program (`_generate_jit`) with N as the runtime
token budget, so t1 and tN are the same program (one compile per batch size).

Roofline: a decode step must read every weight of the decoder layers, the final norm and the
LM head once (W bytes; embedding rows are negligible) and the KV cache of the tokens so far.
Over the N - 1 measured steps the context grows from prompt + 1 to prompt + N - 1 tokens, so
the mean KV bytes read per step are
    KV = 2 (k and v) * layers * batch * (prompt + N / 2) * kv_heads * head_dim * bytes(bf16),
and the fastest any decoder can go at HBM bandwidth BW is
    roofline tokens/s = batch * BW / (W + KV);   fraction of roofline = measured / roofline.
BW is the vendor figure for known GPUs (H200 SXM: 4.8 TB/s, bench/gpu_suite.py) and, on a
CPU, the bandwidth measured in the same run (bench/generate.py's `memory_bandwidth`).

Prints one JSON line (contract keys: decode_tokens_per_s_b<B>, torch_decode_tokens_per_s_b<B>,
decode_fraction_of_roofline_b<B> for each batch B; every figure under "batches") and a
one-line summary. `--partial PATH` rewrites PATH with the figures so far after each batch.
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
# Both frameworks share one GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

SIZES = ("13b", "tiny")
DEFAULTS = {  # per size
    "13b": {"prompt_tokens": 128, "new_tokens": 128},
    "tiny": {"prompt_tokens": 16, "new_tokens": 16},
}


def model_config(size: str, dtype: str = "bfloat16"):
    """The QilinConfig of a bench size: `13b` (LLaMA-2-13B decoder) or `tiny` (the test preset)."""
    from qilin_jax.models import model_preset

    if size not in SIZES:
        raise SystemExit(f"unknown --size {size!r}; use one of {', '.join(SIZES)}")
    cfg = model_preset("qilin_med_vl_13b" if size == "13b" else "tiny")
    # `auto` picks the XLA attention for cached decoding and the platform's kernel for prefill.
    return dataclasses.replace(cfg, dtype=dtype, attention="auto")


def init_value(name: str) -> float | None:
    """The constant a parameter called `name` starts at in our models (`common.param(value=)`):
    1 for norm weights and LayerNorm scales, 0 for biases; None for the normal(0.02) ones."""
    if name.endswith("bias"):
        return 0.0
    if "norm" in name or name.endswith("scale"):
        return 1.0
    return None


def _leaf_name(path) -> str:
    """The parameter's attribute name from a state pytree path (dict keys or attribute names;
    flax versions differ in what they add after it: `.value`, an index)."""
    names = [
        n for n in (getattr(k, "key", getattr(k, "name", None)) for k in path) if isinstance(n, str) and n != "value"
    ]
    return names[-1]


def init_on_device(cfg, seed: int = 0):
    """Our model with random weights in the compute dtype, made on the default device one
    parameter (and, stacked, one layer) at a time: a jitted normal(0.02) drawn in that dtype,
    or the constant of `init_value`. No host copy, and the RNG's temporaries stay under ~3 GB
    for the 13B model (compiled on a CPU, `memory_analysis`): the model's own initialiser in
    one jit would need ~124 GB of them next to the 27 GB of bf16 weights."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qilin_jax.models import QilinMedVL
    from qilin_jax.models.common import DTYPES

    dtype = DTYPES[cfg.dtype]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QilinMedVL(cfg, rngs=nnx.Rngs(seed))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def draw(key, shape):
        return jnp.asarray(0.02, dtype) * jax.random.normal(key, shape, dtype)

    @functools.partial(jax.jit, static_argnames=("shape", "fill"), out_shardings=device)
    def make(key, *, shape, fill):
        if fill is not None:
            return jnp.full(shape, fill, dtype)
        if len(shape) >= 3:  # stacked layers: one layer at a time bounds the RNG's temporaries
            return jax.lax.map(lambda k: draw(k, shape[1:]), jax.random.split(key, shape[0]))
        return draw(key, shape)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    values = [
        make(keys[i], shape=tuple(leaf.shape), fill=init_value(_leaf_name(path)))
        for i, (path, leaf) in enumerate(leaves)
    ]
    state = jax.tree_util.tree_unflatten(treedef, values)
    jax.block_until_ready(state)
    return nnx.merge(graphdef, state)


def torch_model(cfg, device: str):
    """transformers LlamaForCausalLM of the config's decoder shapes, random bf16 weights
    initialised on `device`, SDPA attention, eval mode."""
    import torch
    import transformers

    from tests.torch_ref import hf_text_config

    hf = hf_text_config(cfg)
    hf._attn_implementation = "sdpa"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def kv_cache_bytes_per_step(cfg, batch: int, prompt: int, new_tokens: int, itemsize: int) -> int:
    """Mean bytes of KV cache one decode step reads over the N - 1 measured steps (see the docstring)."""
    t = cfg.text
    mean_context = prompt + new_tokens / 2
    return int(2 * t.num_hidden_layers * batch * mean_context * t.num_key_value_heads * t.head_dim * itemsize)


def hbm_bandwidth(device_kind: str, platform: str, measure_mb: int) -> tuple[float, str]:
    """(bytes/s, source): the vendor HBM figure for a known GPU, else (CPU) measured here."""
    from bench.gpu_suite import HBM_BYTES_PER_S

    kind = device_kind.lower()
    for key in sorted(HBM_BYTES_PER_S, key=len, reverse=True):
        if key in kind:
            return HBM_BYTES_PER_S[key], f"spec ({key})"
    if platform != "cpu":
        raise SystemExit(f"no HBM bandwidth known for {device_kind!r}: pass --hbm-bytes-per-s")
    from bench.generate import memory_bandwidth

    return max(memory_bandwidth(measure_mb).values()) * 1e9, f"measured ({measure_mb} MB matrix-vector)"


def _sig(x: float) -> float:
    """x to 6 significant digits (fractions of a roofline can be small on a CPU)."""
    return float(f"{x:.6g}")


def prompt_ids(cfg, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    """[batch, tokens] random text ids starting with BOS (no image tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(batch, tokens)).astype(np.int64)
    ids[:, 0] = cfg.text.bos_token_id
    return ids


class Ours:
    """Our generate program for one batch size: t1 and tN run the same compiled program."""

    def __init__(self, model, ids: np.ndarray, new_tokens: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from qilin_jax.infer import generate as G

        self.jax, self.G = jax, G
        self.model = model
        self.ids, self.mask, self.slots = G._prepare(model, ids, None, new_tokens, None)
        self.graphdef, self.state = nnx.split(model)
        # Mirror `generate`: unstacked layers on CPU, the scan over stacked layers elsewhere.
        self.layers, self.unstack = G.decode_layers(model, self.graphdef, self.state, new_tokens)
        self.args = (jnp.asarray(self.ids), jnp.asarray(self.mask))
        self.max_tokens = G.bucket(new_tokens)
        self.pad = model.config.text.pad_token_id

    def __call__(self, n: int) -> np.ndarray:
        jnp, G = self.jax.numpy, self.G
        out = G._generate_jit(
            self.graphdef,
            self.state,
            *self.args,
            None,
            jnp.int32(n),
            jnp.int32(-1),
            jnp.int32(self.pad),
            self.jax.random.PRNGKey(0),
            self.layers,
            slots=self.slots,
            max_tokens=self.max_tokens,
            sampling=G.SamplingConfig(),
            unstack=self.unstack,
        )
        return np.asarray(out)[:, :n]


class Theirs:
    """transformers `generate`, greedy, exactly n new tokens (eos suppressed by min_new_tokens)."""

    def __init__(self, model, ids: np.ndarray, device: str):
        import torch

        self.torch, self.model, self.device = torch, model, device
        self.ids = torch.from_numpy(ids).to(device)
        self.mask = torch.ones_like(self.ids)

    def __call__(self, n: int) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids,
                attention_mask=self.mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out[:, self.ids.shape[1] :].cpu().numpy()


def measure(fn, batch: int, prompt: int, new_tokens: int, repeats: int, min_seconds: float = 1.0) -> dict:
    """Prefill and decode tokens/s of a generate callable (bench/generate.py's method)."""
    from bench.generate import _best_time

    start = time.perf_counter()
    got = fn(new_tokens)  # warm-up (our compile) and a check that exactly N tokens come back
    warmup = time.perf_counter() - start
    if got.shape != (batch, new_tokens):
        raise RuntimeError(f"generate returned shape {got.shape}, expected {(batch, new_tokens)}")
    fn(1)
    t1 = _best_time(lambda: fn(1), repeats, min_seconds)
    tn = _best_time(lambda: fn(new_tokens), repeats, min_seconds)
    if tn <= t1:  # noise larger than N - 1 decode steps: no decode speed can be read from it
        raise RuntimeError(
            f"generating {new_tokens} tokens ({tn:.4g} s) was not slower than 1 ({t1:.4g} s): "
            f"raise --repeats / --min-seconds or --new-tokens"
        )
    return {
        "prefill_s": round(t1, 5),
        "generate_s": round(tn, 5),
        "warmup_s": round(warmup, 3),
        "prefill_tokens_per_s": batch * prompt / t1,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (tn - t1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="13b", choices=SIZES)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="per row (default 128; tiny 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="(default 128; tiny 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="time each figure over at least this many seconds of runs (and --repeats runs)",
    )
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument(
        "--hbm-bytes-per-s",
        type=float,
        default=None,
        help="roofline bandwidth (default: the spec of a known GPU, measured on CPU)",
    )
    ap.add_argument("--bandwidth-mb", type=int, default=256, help="CPU bandwidth measurement size")
    ap.add_argument("--partial", default=None, help="rewrite this file with the figures so far after each batch")
    args = ap.parse_args(argv)
    defaults = DEFAULTS[args.size]
    prompt = args.prompt_tokens or defaults["prompt_tokens"]
    new_tokens = args.new_tokens or defaults["new_tokens"]
    if new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode speed needs at least one decode step)")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    frameworks = [f for f in args.frameworks.split(",") if f]

    import jax

    from bench.generate import decode_weight_bytes
    from qilin_jax.models.qilin import param_count

    cfg = model_config(args.size, args.dtype)
    dev = jax.devices()[0]
    plat = dev.platform
    itemsize = np.dtype(jax.numpy.dtype(args.dtype)).itemsize
    if args.hbm_bytes_per_s:
        bw, bw_source = args.hbm_bytes_per_s, "--hbm-bytes-per-s"
    else:
        bw, bw_source = hbm_bandwidth(dev.device_kind, plat, args.bandwidth_mb)
    t = cfg.text
    out = {
        "bench": "decode_13b",
        "size": args.size,
        "platform": plat,
        "device": dev.device_kind,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "text": {
            k: getattr(t, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
        "llm_params": param_count(cfg)["llm"],
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "min_seconds": args.min_seconds,
        "hbm_bytes_per_s": bw,
        "hbm_bytes_per_s_source": bw_source,
        "frameworks": frameworks,
        "batches": {},
    }

    def save_partial():
        if args.partial:
            tmp = args.partial + ".tmp"
            Path(tmp).write_text(json.dumps(out))
            os.replace(tmp, args.partial)

    ours = theirs = None
    out["init_s"] = {}
    if "jax" in frameworks:
        start = time.perf_counter()
        ours = init_on_device(cfg)
        out["init_s"]["jax"] = round(time.perf_counter() - start, 3)
        out["weight_bytes"] = decode_weight_bytes(ours)
        stats = dev.memory_stats() or {}
        if "bytes_in_use" in stats:
            out["jax_bytes_in_use_after_init"] = int(stats["bytes_in_use"])
    if "torch" in frameworks:
        import torch
        import transformers

        tdev = "cuda" if plat == "gpu" and torch.cuda.is_available() else "cpu"
        out["torch"], out["transformers"], out["torch_device"] = torch.__version__, transformers.__version__, tdev
        start = time.perf_counter()
        theirs = torch_model(cfg, tdev)
        out["init_s"]["torch"] = round(time.perf_counter() - start, 3)
        if "weight_bytes" not in out:  # the same tensors, in the torch layout
            named = dict(theirs.named_parameters())
            out["weight_bytes"] = int(
                sum(p.numel() * p.element_size() for k, p in named.items() if not k.endswith("embed_tokens.weight"))
            )
    save_partial()

    for B in batches:
        ids = prompt_ids(cfg, B, prompt)
        kv = kv_cache_bytes_per_step(cfg, B, prompt, new_tokens, itemsize)
        per_step = out["weight_bytes"] + kv
        roof = B * bw / per_step
        row = {"kv_cache_bytes_per_step": kv, "bytes_per_step": per_step, "roofline_tokens_per_s": roof}
        if ours is not None:
            r = measure(Ours(ours, ids, new_tokens), B, prompt, new_tokens, args.repeats, args.min_seconds)
            row.update(
                decode_tokens_per_s=r["decode_tokens_per_s"],
                prefill_tokens_per_s=r["prefill_tokens_per_s"],
                decode_fraction_of_roofline=r["decode_tokens_per_s"] / roof,
                seconds={k: r[k] for k in ("prefill_s", "generate_s", "warmup_s")},
            )
        if theirs is not None:
            r = measure(Theirs(theirs, ids, out["torch_device"]), B, prompt, new_tokens, args.repeats, args.min_seconds)
            row.update(
                torch_decode_tokens_per_s=r["decode_tokens_per_s"],
                torch_prefill_tokens_per_s=r["prefill_tokens_per_s"],
                torch_decode_fraction_of_roofline=r["decode_tokens_per_s"] / roof,
                torch_seconds={k: r[k] for k in ("prefill_s", "generate_s", "warmup_s")},
            )
        if ours is not None and theirs is not None:
            row["decode_ratio_vs_torch"] = row["decode_tokens_per_s"] / row["torch_decode_tokens_per_s"]
            row["prefill_ratio_vs_torch"] = row["prefill_tokens_per_s"] / row["torch_prefill_tokens_per_s"]
        out["batches"][str(B)] = {k: (_sig(v) if isinstance(v, float) else v) for k, v in row.items()}
        for k in (
            "decode_tokens_per_s",
            "torch_decode_tokens_per_s",
            "decode_fraction_of_roofline",
            "torch_decode_fraction_of_roofline",
            "decode_ratio_vs_torch",
        ):
            if k in row:
                out[f"{k}_b{B}"] = _sig(row[k])
        save_partial()

    print(json.dumps(out))
    print(
        "; ".join(
            f"batch {B}: ours {r.get('decode_tokens_per_s', float('nan')):.1f} tok/s "
            f"({r.get('decode_fraction_of_roofline', float('nan')):.0%} of roofline), torch "
            f"{r.get('torch_decode_tokens_per_s', float('nan')):.1f} tok/s "
            f"({r.get('torch_decode_fraction_of_roofline', float('nan')):.0%}); roofline "
            f"{r['roofline_tokens_per_s']:.1f} tok/s at {bw / 1e12:.2f} TB/s"
            for B, r in out["batches"].items()
        )
        + f" [{args.size} on {dev.device_kind}]"
    )
    return out


if __name__ == "__main__":
    main()
