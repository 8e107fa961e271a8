"""Model FLOPs per training step (the MFU formula) and per-device peaks."""

from __future__ import annotations

from qilin_jax.models.configs import QilinConfig

# Dense bf16 peak TFLOP/s per device (vendor figures).
PEAK_TFLOPS = {
    "a100": 312.0,
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "l4": 121.0,
    "a10": 125.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
}


def device_peak_tflops(device) -> float | None:
    """The peak of a jax device by its kind, or None (e.g. CPU: measure it, see bench/)."""
    kind = getattr(device, "device_kind", "").lower()
    for k in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if k in kind:
            return PEAK_TFLOPS[k]
    return None


def _llm_matmul_params(cfg: QilinConfig) -> int:
    t = cfg.text
    per_layer = (
        t.hidden_size * t.num_attention_heads * t.head_dim * 2
        + t.hidden_size * t.num_key_value_heads * t.head_dim * 2
        + 3 * t.hidden_size * t.intermediate_size
    )
    return t.num_hidden_layers * per_layer  # the LM head is counted apart (head_tokens)


def _vit_matmul_params(cfg: QilinConfig, layers: int) -> int:
    v = cfg.vision
    per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    patch = v.patch_size**2 * v.num_channels * v.hidden_size
    return layers * per_layer + patch


def step_flops(
    cfg: QilinConfig,
    batch: int,
    seq: int,
    images: int,
    *,
    llm_trainable: bool,
    adapter_trainable: bool = True,
    vision_trainable: bool = False,
    head_tokens: int | None = None,
) -> float:
    """Model FLOPs of one training step (matmuls; causal attention counted at half).

    Forward = 2 x params x tokens. Backward: activation gradients (2x) wherever something
    before the layer trains, weight gradients (2x) only for trainable weights. Stage 1
    (frozen LLM) is ~4x N x tokens in the LLM, stage 2 ~6x. The LM head is counted on
    `head_tokens` positions (default every token, the usual formula; with
    `loss_supervised_only` the step computes it only on the supervised tokens, and counting
    the skipped positions would overstate the utilisation).
    """
    t = cfg.text
    tokens = batch * seq
    head_tokens = tokens if head_tokens is None else head_tokens
    n_llm = _llm_matmul_params(cfg)
    attn = 2 * 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq * tokens / 2  # QK^T and AV, causal
    fwd_llm = 2 * n_llm * tokens + attn + 2 * t.hidden_size * t.vocab_size * head_tokens
    llm = fwd_llm * (1 + 1 + (1 if llm_trainable else 0))  # fwd + act grads (+ weight grads)

    vit = _vit_forward_flops(cfg, images) * (3 if vision_trainable else 1)
    adapter = _adapter_forward_flops(cfg, images) * (3 if adapter_trainable else 2)
    return float(llm + vit + adapter)


def _vit_forward_flops(cfg: QilinConfig, images: int) -> float:
    """ViT forward FLOPs for `images` images, up to the feature layer the adapter reads."""
    v = cfg.vision
    n_layers = (
        v.num_hidden_layers + 1 + cfg.vision_feature_layer if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    )
    vt = v.num_patches + 1
    vit_tokens = images * vt
    return 2 * _vit_matmul_params(cfg, n_layers) * vit_tokens + 2 * 2 * n_layers * v.hidden_size * vt * vit_tokens


def _adapter_forward_flops(cfg: QilinConfig, images: int) -> float:
    a_params = cfg.vision.hidden_size * cfg.text.hidden_size + (
        cfg.text.hidden_size**2 if cfg.adapter == "mlp2x_gelu" else 0
    )
    return 2 * a_params * images * cfg.image_tokens


def generate_flops(cfg: QilinConfig, prompt_tokens: int, new_tokens: int, images: int) -> float:
    """Model FLOPs of answering one request: the prefill of `prompt_tokens` positions (its
    `images` through the ViT and adapter; causal attention at half; the LM head on the last
    position), then new_tokens - 1 decode steps of one position each (decoder, attention over
    the context so far, LM head). The work any implementation must do: a lower bound on time
    at a device's matmul rate (bench/serve.py)."""
    t = cfg.text
    n_llm = _llm_matmul_params(cfg)
    attn_per_key = 2 * 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim  # QK^T and AV
    head = 2 * t.hidden_size * t.vocab_size
    T, steps = prompt_tokens, max(new_tokens - 1, 0)
    prefill = 2 * n_llm * T + attn_per_key * T * T / 2 + head
    prefill += _vit_forward_flops(cfg, images) + _adapter_forward_flops(cfg, images)
    contexts = steps * (T + 1) + steps * (steps - 1) / 2  # step i attends to T + 1 + i positions
    decode = steps * (2 * n_llm + head) + attn_per_key * contexts
    return float(prefill + decode)
