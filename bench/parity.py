"""Print the measured parity figures (relative errors vs transformers PyTorch, random weights).

    python bench/parity.py      # one JSON line + a one-line summary

The tests (tests/test_models_parity.py, tests/test_generate.py) assert the thresholds; this
prints the numbers behind them.
"""
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
from tests.test_models_parity import LLAMA_VARIANTS, _Holder, _llava_batch, tiny  # noqa: E402


def max_grad_err(ref, ours):
    errs = [R.rel_err(ours[p], g) for p, g in ref.items()
            if np.linalg.norm(g) > 1e-6 and not p.endswith("k_bias")]
    return max(errs)


def main():
    out = {}
    from qilin_jax.models.vit import VisionTransformer
    cfg = tiny()
    tm = R.build("clip", cfg)
    h = _Holder("vision", VisionTransformer(cfg.vision, rngs=nnx.Rngs(1)))
    R.to_jax("clip", tm, h, cfg)
    px = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(px), output_hidden_states=True)
    ours = h.vision(jnp.asarray(px), layer=cfg.vision.num_hidden_layers, all_hidden_states=True)
    out["clip_hidden_states_max_rel"] = max(R.rel_err(ours[i], x.numpy()) for i, x in enumerate(ref.hidden_states))

    from qilin_jax.models.llama import LlamaModel
    from qilin_jax.models.qilin import cross_entropy, shift_labels
    for name, kw in sorted(LLAMA_VARIANTS.items()):
        c = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **kw))
        tm = R.build("llama", c, seed=3)
        hold = _Holder("llm", LlamaModel(c.text, rngs=nnx.Rngs(2)))
        R.to_jax("llama", tm, hold, c)
        rng = np.random.default_rng(1)
        ids = rng.integers(3, c.text.vocab_size, size=(2, 12))
        mask = np.ones((2, 12), np.int64)
        mask[1, 9:] = 0
        labels = np.where(mask == 1, ids, -100)
        o = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
        o.loss.backward()

        def f(m):
            seg = jnp.asarray(mask, jnp.int32)
            hdn, _ = m.llm(m.llm.embed(jnp.asarray(ids)), segment_ids=seg,
                           position_ids=jnp.maximum(jnp.cumsum(seg, 1) - 1, 0))
            t, n = cross_entropy(hdn, m.llm.head_kernel(), shift_labels(jnp.asarray(labels)))
            return t / n, m.llm.logits(hdn)

        (loss, logits), g = nnx.value_and_grad(f, has_aux=True)(hold)
        v = mask.astype(bool)
        out[f"llama_{name}"] = {
            "logits_rel": R.rel_err(np.asarray(logits)[v], o.logits.detach().numpy()[v]),
            "loss_rel": R.rel_err(loss, o.loss.item()),
            "grads_max_rel": max_grad_err(R.torch_grads_flat("llama", tm, c),
                                          nested_to_flat(nnx.state(g, nnx.Param).to_pure_dict()))}

    tm = R.build("llava", cfg, seed=5)
    model = QilinMedVL(cfg, rngs=nnx.Rngs(0))
    R.to_jax("llava", tm, model, cfg)
    ids, mask, labels, px = _llava_batch(cfg, np.random.default_rng(2))
    o = tm(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px),
           attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    o.loss.backward()

    def lf(m):
        r = m(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), labels=jnp.asarray(labels))
        return r.loss, r.logits

    (loss, logits), g = nnx.value_and_grad(lf, has_aux=True)(model)
    v = mask.astype(bool)
    ref_logits = o.logits.detach().numpy()[v]
    out["llava"] = {"logits_rel": R.rel_err(np.asarray(logits)[v], ref_logits),
                    "loss_rel": R.rel_err(loss, o.loss.item()),
                    "grads_max_rel": max_grad_err(R.torch_grads_flat("llava", tm, cfg),
                                                  nested_to_flat(nnx.state(g, nnx.Param).to_pure_dict()))}
    bf = QilinMedVL(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    R.to_jax("llava", tm, bf, cfg)
    out["llava_bf16_logits_rel_vs_fp32_torch"] = R.rel_err(
        np.asarray(bf(ids, px, mask).logits, np.float32)[v], ref_logits)
    print(json.dumps(out))
    worst = max(out["llava"].values())
    print(f"parity: CLIP hidden {out['clip_hidden_states_max_rel']:.1e}, llava logits/loss/grads worst "
          f"{worst:.1e}, bf16 logits {out['llava_bf16_logits_rel_vs_fp32_torch']:.1e}")


if __name__ == "__main__":
    main()
