"""Build `transformers` PyTorch reference models that mirror a QilinConfig (tests and benches)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from converters.mapping import convert_state, load_into_model


def hf_vision_config(cfg):
    v = cfg.vision
    return transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        projection_dim=v.hidden_size,
    )


def hf_text_config(cfg):
    t = cfg.text
    kw = {}
    if t.rope_scaling:
        kw["rope_scaling"] = dict(t.rope_scaling, rope_theta=t.rope_theta)
    return transformers.LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        **kw,
    )


def hf_llava_config(cfg):
    if cfg.adapter != "mlp2x_gelu":
        raise ValueError("HF llava has only the mlp2x_gelu adapter")
    return transformers.LlavaConfig(
        vision_config=hf_vision_config(cfg),
        text_config=hf_text_config(cfg),
        image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.text.tie_word_embeddings,
    )


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05):
    """Random values for every parameter (norm weights around 1), so no mapping hides behind
    a default initialisation of ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                r = r + 1.0
            p.copy_(r.to(p.dtype))
    return model


def build(kind: str, cfg, seed: int = 0):
    """A random-weight eval-mode torch model: 'clip', 'llama' or 'llava'."""
    torch.manual_seed(seed)
    if kind == "clip":
        m = transformers.CLIPVisionModel(hf_vision_config(cfg))
    elif kind == "llama":
        m = transformers.LlamaForCausalLM(hf_text_config(cfg))
    elif kind == "llava":
        m = transformers.LlavaForConditionalGeneration(hf_llava_config(cfg))
    else:
        raise ValueError(kind)
    m.config._attn_implementation = "eager"
    for sub in m.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    return randomize_(m.float().eval(), seed)


FORMAT_OF = {"clip": "hf-clip-vision", "llama": "hf-llama", "llava": "hf-llava-v5"}
PARTS_OF = {"clip": ("vision",), "llama": ("llm",), "llava": None}


def state_items(tensors):
    """(key, float32 numpy) pairs from a torch state dict or a dict of grads."""
    for k, v in tensors.items():
        yield k, v.detach().float().cpu().numpy()


def to_jax(kind: str, torch_model, jax_model, cfg):
    """Copy a torch reference's weights into a jax model through the converter key tables."""
    flat = convert_state(state_items(torch_model.state_dict()), cfg, FORMAT_OF[kind], parts=PARTS_OF[kind])
    return load_into_model(jax_model, flat)


def torch_grads_flat(kind: str, torch_model, cfg):
    """The torch model's .grad of every parameter, mapped to qilin-jax parameter paths."""
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in torch_model.named_parameters()}
    return convert_state(state_items(grads), cfg, FORMAT_OF[kind], parts=PARTS_OF[kind])


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    na = np.linalg.norm(a - b)
    return float(na / nb) if nb > 0 else float(na)
