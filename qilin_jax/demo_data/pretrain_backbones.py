"""Pretrain the demo's tiny backbones, the stand-ins of CLIP ViT-L/14-336 and LLaMA-2-13B.

    python -m qilin_jax.demo_data.pretrain_backbones --out qilin_jax/demo_data/pretrained

Writes two HF checkpoints and a checksum manifest (what the demo ships):
  clip_vit/   config.json (CLIPVisionConfig) + model.safetensors (`vision_model.*`, float16)
  llama/      config.json (LlamaConfig) + model.safetensors (`model.*`, `lm_head.weight`, float16)
  manifest.json  sha256 of every file, the command, the seed, the wall time, the probe scores

The demo (`prepare_demo`) checks the files against the manifest and converts them with
`converters.to_jax`, as a user converts the real CLIP and LLaMA-2; stage 1 then trains the
adapter alone and stage 2 the LLM + adapter with the ViT frozen, the release's recipe.

The ViT (the shapes of configs/demo.yaml's `model:`) is trained on synthetic images of its own
RNG streams (`make_demo._SPLIT_ID`: none of them is a demo image, held-out or not),
preprocessed exactly as the data pipeline does it (`square` or `pad`, composites included).
Its objective is supervised and multi-task: every patch token of the layer the adapter reads
(`vision_feature_layer`, the penultimate) predicts the whole finding: modality, lesion count,
size, kind and which quadrants hold a lesion; so does CLIP's pooled output (the class token of
the last layer after post_layernorm). A frozen tower whose every image token carries the
finding is what a tiny stage 2 can read within a CPU budget. The LLaMA is trained as a
language model (next-token loss on every token) on the demo's Chinese text in the templates
the stages use: captions in `plain`, questions and answers in Vicuna `v1` (system prompt
included), text only.

Deterministic for a seed on a given machine (seeded data, parameters and batch order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qilin_jax.demo_data import make_demo
from qilin_jax.demo_data import templates as T

DEFAULT_OUT = Path(__file__).resolve().parent / "pretrained"
MANIFEST = "manifest.json"
VISION_DIR = "clip_vit"
LLM_DIR = "llama"
STORE_DTYPE = np.float16  # halves the shipped bytes; the probe scores are measured after the round trip

# The finding as classification targets: (name, classes). Kind 0 and size 0 are "no lesion".
HEADS = (("modality", 4), ("count", 4), ("size", 4), ("kind", 3), ("quadrants", 4))


class BackboneChecksumError(ValueError):
    """A shipped backbone file is missing or differs from its manifest checksum."""


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_backbones(root: str | os.PathLike) -> dict:
    """Check every file of `root/manifest.json` against its sha256; returns the manifest.
    Raises BackboneChecksumError naming the first missing or mismatching file."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BackboneChecksumError(f"{mpath}: no checksum manifest (remake it: python -m {__spec__.name})")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    for name, want in manifest["sha256"].items():
        f = root / name
        if not f.is_file():
            raise BackboneChecksumError(f"{f}: listed in {mpath} but missing")
        got = sha256_file(f)
        if got != want:
            raise BackboneChecksumError(
                f"{f}: sha256 {got} does not match {want} in {mpath} (a damaged or Git LFS pointer "
                f"file? remake the backbones: python -m {__spec__.name} --out {root})"
            )
    return manifest


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def demo_model_config(config: str = "demo"):
    """The QilinConfig of a run config's `model:` section (default: the bundled demo's)."""
    from qilin_jax.config import find_config, load_config

    return load_config(find_config(config)).model_config()


def finding_labels(case: dict) -> np.ndarray:
    """Return the int targets of HEADS for a case; -1 = not asked (quadrants of composites)."""
    n = case["count"]
    size = 1 + T.SIZES.index(case["size"]) if n else 0
    kind = (1 if case["kind"] == "bright" else 2) if n else 0
    if case["n_images"] > 1:  # panels side by side: the quadrants of the whole image mean nothing
        quads = [-1] * 4
    else:
        quads = [int(q in case["locations"]) for q in T.LOCATIONS]
    return np.array([T.MODALITY_KEYS.index(case["modality"]), n, size, kind, *quads], np.int32)


def render_vision_sample(seed: int, split: str, idx: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 RGB [S, S, 3] as the pipeline feeds it, targets) of one pretraining image:
    a demo-distribution case (composites and 5:4 images included), `square` or `pad` mode."""
    from PIL import Image

    from qilin_jax.data.images import center_crop, composite_images, expand_to_square, resize_shortest_edge

    rng = make_demo._rng(seed, split, idx)
    case = T.sample_case(rng, n_images=make_demo._n_images(rng, True))
    h, w = make_demo._image_shape(rng, image_size, case["n_images"])
    panels = [
        Image.fromarray(make_demo.render_image(case, rng, h, w), "L").convert("RGB") for _ in range(case["n_images"])
    ]
    img = composite_images(panels) if len(panels) > 1 else panels[0]
    if rng.uniform() < 0.5:  # stage 1 reads `square`, stage 2 `pad`
        img = expand_to_square(img)
    img = center_crop(resize_shortest_edge(img, image_size), image_size)
    return np.asarray(img, np.uint8), finding_labels(case)


def vision_set(seed: int, split: str, n: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 images [n, S, S, 3], targets [n, 8]) of `n` pretraining images."""
    pairs = [render_vision_sample(seed, split, i, image_size) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def normalize_batch(images: np.ndarray) -> np.ndarray:
    """CLIP-normalised float32 [n, 3, S, S] from uint8 [n, S, S, 3] (the pipeline's own table)."""
    from qilin_jax.data.images import _LUT

    return np.stack([_LUT[c][images[..., c]] for c in range(3)], axis=1)


def text_corpus(seed: int, n: int, tokenizer, image_token_id: int) -> np.ndarray:
    """Return one int32 token stream of `n` cases' text: each case's caption in the `plain`
    template and an instruction conversation in `v1`, images left out."""
    from qilin_jax.data import tokenize_conversation

    out = []
    for i in range(n):
        rng = make_demo._rng(seed, "pretrain_text", i)
        case, qtypes, topic = make_demo.instruction_qtypes(rng)
        cap = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": T.caption(case, rng)}]
        conv = make_demo.instruction_turns(case, qtypes, topic, rng)
        for turns, template in ((cap, "plain"), (conv, "v1")):
            ids, _ = tokenize_conversation(turns, tokenizer, template, image_tokens=1, image_token_id=image_token_id)
            out.append(ids[ids != image_token_id])
    return np.concatenate(out).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _adamw(lr: float, steps: int, warmup_ratio: float = 0.05):
    """AdamW with the stages' warmup + cosine schedule and clipping at 1.0."""
    import optax

    from qilin_jax.train.optim import warmup_cosine

    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(warmup_cosine(lr, steps, warmup_ratio)))


def _vision_logits(vit, heads, pixels, layer: int):
    """(per-token logits [n, tokens, C] of the adapter's layer, pooled logits [n, C])."""
    import jax.numpy as jnp

    hs = vit(pixels, layer=-1, all_hidden_states=True)  # [layers + 1, n, 1 + patches, D]
    feats = hs[layer][:, 1:]
    pooled = vit.pooled(hs[-1])
    w, b = heads["tokens"]
    wp, bp = heads["pooled"]
    return jnp.einsum("ntd,dc->ntc", feats, w) + b, pooled @ wp + bp


def _finding_loss(logits, targets):
    """Summed cross-entropy of HEADS over [.., C] logits, and the accuracies per head."""
    import jax
    import jax.numpy as jnp

    loss, accs, start = 0.0, {}, 0
    for j, (name, c) in enumerate(HEADS[:-1]):
        lg = logits[..., start : start + c]
        t = jnp.broadcast_to(targets[:, j].reshape((-1,) + (1,) * (lg.ndim - 2)), lg.shape[:-1])
        loss = loss + jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(lg), t[..., None], -1))
        accs[name] = jnp.mean(jnp.argmax(lg, -1) == t)
        start += c
    q = logits[..., start : start + 4]
    tq = targets[:, 4:8].reshape((-1,) + (1,) * (q.ndim - 2) + (4,))
    tq = jnp.broadcast_to(tq, q.shape)
    m = tq >= 0
    bce = jnp.maximum(q, 0) - q * jnp.maximum(tq, 0) + jnp.log1p(jnp.exp(-jnp.abs(q)))
    loss = loss + jnp.sum(bce * m) / jnp.maximum(jnp.sum(m), 1) * 4
    accs["quadrants"] = jnp.sum(((q > 0) == (tq > 0)) * m) / jnp.maximum(jnp.sum(m), 1)
    return loss, accs


def train_vision(cfg, *, seed: int, n_images: int, steps: int, batch: int, lr: float, log=print):
    """Train the ViT of `cfg` on the finding; returns (vision params as a nested dict, probe
    accuracy per head on fresh images)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from qilin_jax.models.vit import VisionTransformer

    t0 = time.time()
    vcfg = dataclasses.replace(cfg.vision, position_embedding_init="sincos2d")
    S = vcfg.image_size
    images, targets = vision_set(seed, "pretrain_vision", n_images, S)
    ev_images, ev_targets = vision_set(seed, "pretrain_vision_eval", max(256, n_images // 16), S)
    log(f"vision data: {n_images} + {len(ev_images)} images in {time.time() - t0:.1f} s")
    vit = VisionTransformer(vcfg, rngs=nnx.Rngs(seed))
    graph, params = nnx.split(vit, nnx.Param)
    C = sum(c for _, c in HEADS)
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    D = vcfg.hidden_size
    heads = {
        "tokens": (jax.random.normal(k1, (D, C)) * D**-0.5, jnp.zeros(C)),
        "pooled": (jax.random.normal(k2, (D, C)) * D**-0.5, jnp.zeros(C)),
    }
    layer = cfg.vision_feature_layer
    tx = _adamw(lr, steps)
    train = {"vit": params, "heads": heads}
    opt = tx.init(train)

    def loss_fn(train, pixels, tgt):
        model = nnx.merge(graph, train["vit"])
        tok, pooled = _vision_logits(model, train["heads"], pixels, layer)
        lt, accs = _finding_loss(tok, tgt)
        lp, _ = _finding_loss(pooled, tgt)
        return lt + lp, accs

    @jax.jit
    def step(train, opt, pixels, tgt):
        (loss, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(train, pixels, tgt)
        upd, opt = tx.update(g, opt, train)
        return optax.apply_updates(train, upd), opt, loss, accs

    order = np.random.default_rng(seed)
    perm, pos = order.permutation(n_images), 0
    t1 = time.time()
    for i in range(steps):
        if pos + batch > n_images:
            perm, pos = order.permutation(n_images), 0
        idx = perm[pos : pos + batch]
        pos += batch
        train, opt, loss, accs = step(train, opt, normalize_batch(images[idx]), targets[idx])
        if (i + 1) % max(1, steps // 10) == 0 or i == 0:
            a = {k: round(float(v), 3) for k, v in accs.items()}
            log(f"vision step {i + 1}/{steps} loss {float(loss):.4f} train acc {a}")
    log(f"vision: {steps} steps in {time.time() - t1:.1f} s")
    vit_params = jax.tree.map(lambda a: np.asarray(a).astype(STORE_DTYPE).astype(np.float32), train["vit"])
    probe = vision_probe(cfg, vit_params, train["heads"], ev_images, ev_targets)
    return nnx.State(vit_params).to_pure_dict(), probe


def vision_probe(cfg, vit_params, heads, images, targets) -> dict:
    """Accuracy per head of the pretraining heads reading the adapter's layer of a ViT with
    `vit_params`, on the images given."""
    import dataclasses

    import jax
    from flax import nnx

    from qilin_jax.models.vit import VisionTransformer

    graph, _ = nnx.split(VisionTransformer(dataclasses.replace(cfg.vision), rngs=nnx.Rngs(0)), nnx.Param)
    model = nnx.merge(graph, vit_params)
    fn = jax.jit(lambda p: _finding_loss(_vision_logits(model, heads, p, cfg.vision_feature_layer)[0].mean(1), t)[1])
    accs = []
    for a in range(0, len(images), 256):
        t = targets[a : a + 256]
        accs.append((len(t), jax.device_get(fn(normalize_batch(images[a : a + 256])))))
    n = sum(k for k, _ in accs)
    return {name: round(float(sum(k * v[name] for k, v in accs) / n), 4) for name in accs[0][1]}


def train_llm(cfg, tokenizer, *, seed: int, n_texts: int, steps: int, batch: int, seq: int, lr: float, log=print):
    """Train the LLaMA of `cfg` as a language model on the demo text; returns (params as a
    nested dict, {first, last training loss, held-out loss})."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from qilin_jax.models.llama import LlamaModel

    t0 = time.time()
    stream = text_corpus(seed, n_texts, tokenizer, cfg.image_token_id)
    n_seq = len(stream) // (seq + 1)
    rows = stream[: n_seq * (seq + 1)].reshape(n_seq, seq + 1)
    n_eval = max(8, n_seq // 20)
    ev_rows, rows = rows[:n_eval], rows[n_eval:]
    log(f"text data: {len(stream)} tokens ({len(rows)} + {n_eval} rows of {seq}) in {time.time() - t0:.1f} s")
    llm = LlamaModel(cfg.text, attention_impl="xla", rngs=nnx.Rngs(seed))
    graph, params = nnx.split(llm, nnx.Param)
    tx = _adamw(lr, steps)
    opt = tx.init(params)

    def loss_fn(params, ids):
        model = nnx.merge(graph, params)
        h, _ = model(model.embed(ids[:, :-1]))
        logits = model.logits(h).astype(jnp.float32)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    @jax.jit
    def step(params, opt, ids):
        loss, g = jax.value_and_grad(loss_fn)(params, ids)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    order = np.random.default_rng(seed + 2)
    perm, pos = order.permutation(len(rows)), 0
    losses = []
    t1 = time.time()
    for i in range(steps):
        if pos + batch > len(rows):
            perm, pos = order.permutation(len(rows)), 0
        params, opt, loss = step(params, opt, rows[perm[pos : pos + batch]])
        pos += batch
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 10) == 0 or i == 0:
            log(f"llm step {i + 1}/{steps} loss {losses[-1]:.4f}")
    log(f"llm: {steps} steps in {time.time() - t1:.1f} s")
    params = jax.tree.map(lambda a: np.asarray(a).astype(STORE_DTYPE).astype(np.float32), params)
    held = float(jax.jit(loss_fn)(params, ev_rows))
    return nnx.State(params).to_pure_dict(), {"first": losses[0], "last": losses[-1], "heldout": round(held, 4)}


# ---------------------------------------------------------------------------------------------
# HF checkpoints
# ---------------------------------------------------------------------------------------------
def write_hf(part: str, params: dict, cfg, dst: Path) -> list[str]:
    """Write `params` of part "vision" (as an HF CLIPVisionModel) or "llm" (as an HF
    LlamaForCausalLM) into dst: config.json + model.safetensors (float16). Returns the names."""
    from converters import keys as K
    from converters.mapping import nested_to_flat, untransform
    from converters.to_torch import hf_text_config, hf_vision_config
    from converters.torch_writers import write_safetensors

    flat = {f"{part}/{k}": np.asarray(v) for k, v in nested_to_flat(params).items()}
    fmt = "hf-clip" if part == "vision" else "hf-llama"
    tensors = {}
    for _p, _prefix, rows in K.part_tables(fmt):
        for pattern, path, kind in rows:
            arr = flat.pop(path)
            layers = range(arr.shape[0]) if r"(\d+)" in pattern else [None]
            for layer in layers:
                x = arr if layer is None else arr[layer]
                tensors[K.torch_key(path, layer, fmt)] = np.ascontiguousarray(untransform(x, kind).astype(STORE_DTYPE))
    if flat:
        raise ValueError(f"parameters without an HF key: {sorted(flat)}")
    dst.mkdir(parents=True, exist_ok=True)
    if part == "vision":
        hf = {"architectures": ["CLIPVisionModel"], **hf_vision_config(cfg), "torch_dtype": "float16"}
    else:
        hf = hf_text_config(cfg, cfg.text.vocab_size, "float16")
    (dst / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(dst / "model.safetensors", entries, tensors.__getitem__)
    return ["config.json", "model.safetensors"]


def pretrain(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    config: str = "demo",
    seed: int = 0,
    vision_images: int = 6000,
    vision_steps: int = 500,
    vision_batch: int = 128,
    vision_lr: float = 1e-3,
    texts: int = 3000,
    llm_steps: int = 150,
    llm_batch: int = 16,
    llm_seq: int = 128,
    llm_lr: float = 1e-3,
    log=print,
) -> dict:
    """Pretrain both backbones and write them (with manifest.json) into `out`; returns the manifest."""
    from transformers import AutoTokenizer

    from qilin_jax.config import find_config, load_config

    t0 = time.time()
    run = load_config(find_config(config))
    cfg = run.model_config()
    tokenizer = AutoTokenizer.from_pretrained(run.model.tokenizer)
    vit, probe = train_vision(
        cfg, seed=seed, n_images=vision_images, steps=vision_steps, batch=vision_batch, lr=vision_lr, log=log
    )
    log(f"vision probe (fresh images, the adapter's layer): {probe}")
    llm, lm = train_llm(
        cfg, tokenizer, seed=seed, n_texts=texts, steps=llm_steps, batch=llm_batch, seq=llm_seq, lr=llm_lr, log=log
    )
    log(f"llm loss: {lm}")
    out = Path(out)
    names = [f"{VISION_DIR}/{n}" for n in write_hf("vision", vit, cfg, out / VISION_DIR)]
    names += [f"{LLM_DIR}/{n}" for n in write_hf("llm", llm, cfg, out / LLM_DIR)]
    manifest = {
        "sha256": {n: sha256_file(out / n) for n in names},
        "bytes": {n: (out / n).stat().st_size for n in names},
        "command": "python -m qilin_jax.demo_data.pretrain_backbones " + " ".join(sys.argv[1:])
        if __name__ == "__main__"
        else None,
        "seed": seed,
        "settings": {
            "vision_images": vision_images,
            "vision_steps": vision_steps,
            "vision_batch": vision_batch,
            "vision_lr": vision_lr,
            "texts": texts,
            "llm_steps": llm_steps,
            "llm_batch": llm_batch,
            "llm_seq": llm_seq,
            "llm_lr": llm_lr,
        },
        "vision_probe_accuracy": probe,
        "llm_loss": lm,
        "seconds": round(time.time() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log(f"wrote {out}: {sum(manifest['bytes'].values()) / 1e6:.1f} MB in {manifest['seconds']:.0f} s")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="Pretrain the demo's tiny CLIP ViT and LLaMA (HF checkpoints).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--config", default="demo", help="run config whose `model:` gives the shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-images", type=int, default=6000)
    ap.add_argument("--vision-steps", type=int, default=500)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--llm-steps", type=int, default=150)
    a = ap.parse_args(argv)
    pretrain(
        a.out,
        config=a.config,
        seed=a.seed,
        vision_images=a.vision_images,
        vision_steps=a.vision_steps,
        texts=a.texts,
        llm_steps=a.llm_steps,
    )


if __name__ == "__main__":
    main()
