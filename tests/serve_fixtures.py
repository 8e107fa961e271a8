"""Shared pieces of the serving tests: a live server on 127.0.0.1 (a free port) over a tiny
random model, images as data: URLs, and the reference answers of `qilin_jax.generate`."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

API_KEY = "test-key"


def png_bytes(seed: int = 0, size=(40, 56)) -> bytes:
    """A random grayscale PNG (not square, so `pad` mode matters)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def dicom_bytes() -> bytes:
    """pydicom's CT_small.dcm test file."""
    import pydicom.data

    with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as f:
        return f.read()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    """A base64 data: URL."""
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def reference(server, turns, image: tuple[bytes, str] | None, max_tokens: int, system: str = "", stop=()) -> dict:
    """What the server must answer greedily: `qilin_jax.generate` on the same prompt and image,
    cut at `</s>` / stop strings. {"text", "completion_tokens", "finish_reason"}."""
    from qilin_jax.infer.common import IncrementalDecoder, load_pixels, prompt_ids, template_name
    from qilin_jax.infer.generate import generate

    model, tok, cfg = server.model, server.tokenizer, server.cfg
    ids = prompt_ids(model, tok, turns, template_name(cfg.template, system))
    px = load_pixels(model, [image[0]], [image[1]], cfg.image_mode) if image else None
    out = generate(model, ids[None], px, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id)[0]
    dec = IncrementalDecoder(tok, list(cfg.stop) + list(stop))
    n = 0
    for t in out:
        n += 1
        dec.push(int(t))
        if dec.stopped:
            break
    return {
        "text": dec.text,
        "completion_tokens": n,
        "finish_reason": "stop" if dec.stopped else "length",
        "prompt_tokens": len(ids),
    }


@pytest.fixture(scope="session")
def server():
    """A live server (slots 4, context 256, prompt buckets 64/128/256, API key) on a free port."""
    from transformers import AutoTokenizer

    from qilin_jax.serve.api import Server
    from qilin_jax.serve.config import ServeConfig
    from tests.infer_fixtures import REPO, random_model, tiny_config

    tok = AutoTokenizer.from_pretrained(str(REPO / "qilin_jax" / "demo_data" / "tokenizer"))
    cfg = ServeConfig(
        checkpoint="",
        slots=4,
        max_context=256,
        prompt_buckets=[64, 128],
        max_queue=64,
        api_key=API_KEY,
        max_new_tokens=16,
        max_body_mb=1.0,
    )
    srv = Server(random_model(tiny_config(), seed=0), tok, cfg)
    srv.port = srv.start_background()
    srv.base_url = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.shutdown()


@pytest.fixture(scope="session")
def client(server):
    """The real `openai` client pointed at the server."""
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
