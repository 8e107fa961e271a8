"""Benchmark: convert a synthetic multi-GB 13B-wide checkpoint (sharded safetensors, and
sharded torch .bin with index) with the to-jax path; report seconds and peak RSS against
the largest shard file, then export one result back (to-torch hf-llava).

    python bench/convert.py [--layers 4] [--max-shard-size 2GB] [--dir /tmp/qilin_convert_bench]

Each conversion runs in its own child process, which reports its peak RSS
(getrusage ru_maxrss): the figure includes the Python + JAX baseline, also reported. Prints
one JSON line and a one-line summary. Files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.torch_writers import write_sharded  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import jax  # the baseline: what any conversion process pays before reading a byte
t0 = time.time()
mode = {mode!r}
if mode == "to-jax":
    from converters.to_jax import to_jax
    to_jax({src!r}, {dst!r}, vision={vision!r}, dtype={dtype!r}, log=lambda *a: None)
elif mode == "to-torch":
    from converters.to_torch import to_torch
    to_torch({src!r}, {dst!r}, format="hf-llava", dtype="bfloat16", max_shard_size={shard!r},
             log=lambda *a: None)
else:
    import converters.to_jax, converters.to_torch, qilin_jax.models  # noqa: F401
secs = time.time() - t0
print(json.dumps({{"seconds": secs, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def run_child(mode, src="", dst="", vision=None, dtype="float32", shard="2GB"):
    """Run one conversion in a fresh process; its {'seconds', 'peak_rss'}."""
    code = CHILD.format(
        root=str(ROOT),
        mode=mode,
        src=str(src),
        dst=str(dst),
        vision=str(vision) if vision else None,
        dtype=dtype,
        shard=shard,
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic(shape, seed):
    """A bf16 tensor of `shape` with normal-ish values (a random block tiled: fast)."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(min(n, 1 << 20)) * 0.02).astype(BF16)
    return np.resize(block, n).reshape(shape)


def llm_entries(L, D, M, V, prefix="model.", head="lm_head.weight"):
    out = [(f"{prefix}embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"{prefix}layers.{i}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
        out += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (M, D)),
            (p + "mlp.up_proj.weight", (M, D)),
            (p + "mlp.down_proj.weight", (D, M)),
        ]
    out += [(f"{prefix}norm.weight", (D,)), (head, (V, D))]
    return out


def clip_entries(L, D, M, patch, image):
    n = (image // patch) ** 2 + 1
    out = [
        ("vision_model.embeddings.class_embedding", (D,)),
        ("vision_model.embeddings.patch_embedding.weight", (D, 3, patch, patch)),
        ("vision_model.embeddings.position_embedding.weight", (n, D)),
        ("vision_model.pre_layrnorm.weight", (D,)),
        ("vision_model.pre_layrnorm.bias", (D,)),
        ("vision_model.post_layernorm.weight", (D,)),
        ("vision_model.post_layernorm.bias", (D,)),
    ]
    for i in range(L):
        p = f"vision_model.encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out += [(p + f"{ln}.weight", (D,)), (p + f"{ln}.bias", (D,))]
        for n_ in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(p + f"self_attn.{n_}.weight", (D, D)), (p + f"self_attn.{n_}.bias", (D,))]
        out += [
            (p + "mlp.fc1.weight", (M, D)),
            (p + "mlp.fc1.bias", (M,)),
            (p + "mlp.fc2.weight", (D, M)),
            (p + "mlp.fc2.bias", (D,)),
        ]
    return out


def write(d: Path, entries, kind, shard):
    """Write entries (generated one tensor at a time) as a sharded checkpoint."""
    d.mkdir(parents=True, exist_ok=True)
    shapes = {k: s for k, s in entries}
    seeds = {k: i for i, (k, _) in enumerate(entries)}
    files = write_sharded(
        d, [(k, s, BF16) for k, s in entries], lambda k: synthetic(shapes[k], seeds[k]), kind=kind, max_shard_size=shard
    )
    return [d / f for f in files]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--mlp", type=int, default=13824)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype of the converted checkpoint"
    )
    ap.add_argument("--dir", default="/tmp/qilin_convert_bench")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    L, D, M, V, H = args.layers, args.hidden, args.mlp, args.vocab, args.heads
    llama_cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": D,
        "intermediate_size": M,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "vocab_size": V,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    }
    result = {
        "bench": "convert",
        "layers": L,
        "hidden": D,
        "mlp": M,
        "vocab": V,
        "max_shard_size": args.max_shard_size,
        "out_dtype": args.dtype,
        "formats": {},
    }
    try:
        t0 = time.time()
        # CLIP ViT-L-wide vision tower (2 layers: the LLM is what is big), safetensors.
        clip = root / "clip"
        write(clip, clip_entries(2, 1024, 4096, 14, 336), "safetensors", "10GB")
        (clip / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "clip_vision_model",
                    "hidden_size": 1024,
                    "num_attention_heads": 16,
                    "layer_norm_eps": 1e-5,
                }
            )
        )
        # HF Llama: sharded safetensors + index.
        st = root / "hf_llama"
        st_files = write(st, llm_entries(L, D, M, V), "safetensors", args.max_shard_size)
        (st / "config.json").write_text(json.dumps(llama_cfg))
        # LLaVA release layout: sharded .bin + index, adapter inside, vision separate.
        rel = root / "llava_bin"
        ents = llm_entries(L, D, M, V) + [
            ("model.mm_projector.0.weight", (D, 1024)),
            ("model.mm_projector.0.bias", (D,)),
            ("model.mm_projector.2.weight", (D, D)),
            ("model.mm_projector.2.bias", (D,)),
        ]
        bin_files = write(rel, ents, "bin", args.max_shard_size)
        (rel / "config.json").write_text(
            json.dumps(
                dict(
                    llama_cfg,
                    architectures=["LlavaLlamaForCausalLM"],
                    model_type="llava",
                    mm_projector_type="mlp2x_gelu",
                    mm_hidden_size=1024,
                    mm_vision_select_layer=-2,
                )
            )
        )
        result["generate_seconds"] = round(time.time() - t0, 1)
        base = run_child("baseline")
        result["baseline_rss_gb"] = round(base["peak_rss"] / 1e9, 3)
        for name, src, files in (("safetensors", st, st_files), ("bin", rel, bin_files)):
            dst = root / f"jax_{name}"
            r = run_child("to-jax", src, dst, vision=clip, dtype=args.dtype)
            largest = max(f.stat().st_size for f in files)
            total = sum(f.stat().st_size for f in files)
            out_bytes = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
            result["formats"][name] = {
                "seconds": round(r["seconds"], 1),
                "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
                "largest_shard_gb": round(largest / 1e9, 3),
                "shards": len(files),
                "input_gb": round(total / 1e9, 3),
                "output_gb": round(out_bytes / 1e9, 3),
                "rss_over_largest_shard": round(r["peak_rss"] / largest, 3),
                "read_gb_per_s": round(total / 1e9 / r["seconds"], 3),
            }
            if name == "bin" or args.no_export:
                shutil.rmtree(dst)
        if not args.no_export:
            out = root / "export_hf"
            r = run_child("to-torch", root / "jax_safetensors", out, shard=args.max_shard_size)
            files = list(out.glob("*.safetensors"))
            result["export_hf_llava_bf16"] = {
                "seconds": round(r["seconds"], 1),
                "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
                "largest_shard_gb": round(max(f.stat().st_size for f in files) / 1e9, 3),
                "shards": len(files),
            }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    f = result["formats"]
    line = "; ".join(
        f"{k}: {v['input_gb']:.2f} GB in {v['seconds']:.0f}s, peak RSS {v['peak_rss_gb']:.2f} GB "
        f"= {v['rss_over_largest_shard']:.2f}x largest shard ({v['largest_shard_gb']:.2f} GB)"
        for k, v in f.items()
    )
    ok = all(v["rss_over_largest_shard"] < 1.5 for v in f.values())
    print(
        f"convert bench ({L} layers of {D}/{M}, vocab {V}, bf16 in, {args.dtype} out): {line}; "
        f"baseline RSS {result['baseline_rss_gb']:.2f} GB; target <1.5x: {'PASS' if ok else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
