"""Print the measured parity figures (relative errors vs transformers PyTorch, random weights).

    python bench/parity.py      # one JSON line + a one-line summary

The tests (tests/test_models_parity.py, tests/test_generate.py) assert the thresholds; this
prints the numbers behind them. `measure(torch_device="cuda", jit=True)` is the same
comparison on a GPU (torch float32 there without TF32, our steps jitted): bench/gpu_suite.py.
"""

import contextlib
import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from converters.mapping import nested_to_flat  # noqa: E402
from qilin_jax.models import QilinMedVL  # noqa: E402
from tests import torch_ref as R  # noqa: E402

try:
    import pytest  # noqa: F401  (the test module below uses it for its decorators only)
except ImportError:  # a machine with the runtime dependencies but no pytest (e.g. a GPU image)
    import types

    class _Mark:
        def __getattr__(self, name):
            return lambda *a, **k: lambda f: f

    sys.modules["pytest"] = types.SimpleNamespace(mark=_Mark())
from tests.test_models_parity import LLAMA_VARIANTS, _Holder, _llava_batch, tiny  # noqa: E402


def max_grad_err(ref, ours):
    errs = [R.rel_err(ours[p], g) for p, g in ref.items() if np.linalg.norm(g) > 1e-6 and not p.endswith("k_bias")]
    return max(errs)


def measure(torch_device: str = "cpu", jit: bool = False, variants=None, errors: list | None = None) -> dict:
    """The relative errors (dict of floats) of our CLIP, LLaMA variants (`variants`: names of
    LLAMA_VARIANTS, default all) and LLaVA vs transformers (float32: logits, loss, gradients;
    bf16: logits vs float32 torch), torch on `torch_device`, our forward/backward eager or,
    with `jit`, compiled (one program per model). With an `errors` list, a comparison that
    raises appends "name: error" to it and is left out; without, the exception propagates."""
    dev = torch.device(torch_device)
    if dev.type == "cuda":  # a float32 reference: no TF32 in torch's matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = {}

    def to_dev(x):
        return torch.from_numpy(x).to(dev)

    def grad_fn(f):
        g = nnx.value_and_grad(f, has_aux=True)
        return nnx.jit(g) if jit else g

    def section(name, fn):
        if errors is None:
            return fn()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (recorded for the caller, e.g. bench/gpu_suite.py)
            errors.append(f"{name}: {type(e).__name__}: {e}")
            return None

    cfg = tiny()

    def clip():
        from qilin_jax.models.vit import VisionTransformer

        tm = R.build("clip", cfg).to(dev)
        h = _Holder("vision", VisionTransformer(cfg.vision, rngs=nnx.Rngs(1)))
        R.to_jax("clip", tm, h, cfg)
        px = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            ref = tm(to_dev(px), output_hidden_states=True)

        def vision(m, x):
            return m.vision(x, layer=cfg.vision.num_hidden_layers, all_hidden_states=True)

        ours = (nnx.jit(vision) if jit else vision)(h, jnp.asarray(px))
        out["clip_hidden_states_max_rel"] = max(
            R.rel_err(ours[i], x.cpu().numpy()) for i, x in enumerate(ref.hidden_states)
        )

    def llama(name):
        from qilin_jax.models.llama import LlamaModel
        from qilin_jax.models.qilin import cross_entropy, shift_labels

        c = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **LLAMA_VARIANTS[name]))
        tm = R.build("llama", c, seed=3)
        hold = _Holder("llm", LlamaModel(c.text, rngs=nnx.Rngs(2)))
        R.to_jax("llama", tm, hold, c)
        tm = tm.to(dev)
        rng = np.random.default_rng(1)
        ids = rng.integers(3, c.text.vocab_size, size=(2, 12))
        mask = np.ones((2, 12), np.int64)
        mask[1, 9:] = 0
        labels = np.where(mask == 1, ids, -100)
        o = tm(input_ids=to_dev(ids), attention_mask=to_dev(mask), labels=to_dev(labels))
        o.loss.backward()

        def f(m):
            seg = jnp.asarray(mask, jnp.int32)
            hdn, _ = m.llm(
                m.llm.embed(jnp.asarray(ids)), segment_ids=seg, position_ids=jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)
            )
            t, n = cross_entropy(hdn, m.llm.head_kernel(), shift_labels(jnp.asarray(labels)))
            return t / n, m.llm.logits(hdn)

        (loss, logits), g = grad_fn(f)(hold)
        v = mask.astype(bool)
        out[f"llama_{name}"] = {
            "logits_rel": R.rel_err(np.asarray(logits)[v], o.logits.detach().cpu().numpy()[v]),
            "loss_rel": R.rel_err(loss, o.loss.item()),
            "grads_max_rel": max_grad_err(
                R.torch_grads_flat("llama", tm, c), nested_to_flat(nnx.state(g, nnx.Param).to_pure_dict())
            ),
        }

    ids, mask, labels, px = _llava_batch(cfg, np.random.default_rng(2))
    v = mask.astype(bool)

    def llava_torch():
        tm = R.build("llava", cfg, seed=5).to(dev)
        o = tm(input_ids=to_dev(ids), pixel_values=to_dev(px), attention_mask=to_dev(mask), labels=to_dev(labels))
        o.loss.backward()
        return tm, o

    def llava(tm, o):
        model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
        R.to_jax("llava", tm, model, cfg)

        def lf(m):
            r = m(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), labels=jnp.asarray(labels))
            return r.loss, r.logits

        (loss, logits), g = grad_fn(lf)(model)
        out["llava"] = {
            "logits_rel": R.rel_err(np.asarray(logits)[v], o.logits.detach().cpu().numpy()[v]),
            "loss_rel": R.rel_err(loss, o.loss.item()),
            "grads_max_rel": max_grad_err(
                R.torch_grads_flat("llava", tm, cfg), nested_to_flat(nnx.state(g, nnx.Param).to_pure_dict())
            ),
        }

    def llava_bf16(tm, o):
        bf = QilinMedVL(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
        R.to_jax("llava", tm, bf, cfg)

        def bf_logits(m, ids, px, mask):
            return m(ids, px, mask).logits

        # bf16 at the default matmul precision (what bf16 training and serving run), with
        # attention `auto`: the cuDNN flash kernel on a GPU.
        precision = getattr(jax, "default_matmul_precision", None)
        with precision("default") if precision is not None else contextlib.nullcontext():
            bl = (nnx.jit(bf_logits) if jit else bf_logits)(bf, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask))
        out["llava_bf16_logits_rel_vs_fp32_torch"] = R.rel_err(
            np.asarray(bl, np.float32)[v], o.logits.detach().cpu().numpy()[v]
        )

    section("clip", clip)
    for name in sorted(variants or LLAMA_VARIANTS):
        section(f"llama_{name}", lambda name=name: llama(name))
    ref = section("llava_torch", llava_torch)
    if ref is not None:
        section("llava", lambda: llava(*ref))
        section("llava_bf16", lambda: llava_bf16(*ref))
    return out


def main():
    out = measure()
    print(json.dumps(out))
    worst = max(out["llava"].values())
    print(
        f"parity: CLIP hidden {out['clip_hidden_states_max_rel']:.1e}, llava logits/loss/grads worst "
        f"{worst:.1e}, bf16 logits {out['llava_bf16_logits_rel_vs_fp32_torch']:.1e}"
    )


if __name__ == "__main__":
    main()
