"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real `openai` client: answers
equal `qilin_jax.generate`'s (greedy), batching changes no answer, disconnects free slots, bad
input gets a 4xx naming the field, nothing compiles after warm-up."""

import concurrent.futures as cf
import json
import re
import time

import httpx
import numpy as np
import openai
import pytest

from qilin_jax.serve.engine import Engine, QueueFull, Request, compile_count, default_buckets
from tests.serve_fixtures import (  # noqa: F401
    API_KEY,
    client,
    data_url,
    dicom_bytes,
    png_bytes,
    reference,
    server,
)

MODEL = "qilin-med-vl"


def _image_msg(text, raw, mime="image/png"):
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_url(raw, mime)}}, {"type": "text", "text": text}],
    }


def _metric(server, name, labels=""):
    text = httpx.get(server.base_url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _check(resp, ref):
    assert resp.choices[0].message.content == ref["text"]
    assert resp.choices[0].finish_reason == ref["finish_reason"]
    assert resp.usage.completion_tokens == ref["completion_tokens"]
    assert resp.usage.prompt_tokens == ref["prompt_tokens"]


def test_answers_equal_generate_plain_and_streamed(server, client):
    png, dcm = png_bytes(1), dicom_bytes()
    # One turn about a PNG, with a system message.
    msgs = [{"role": "system", "content": "You are a radiologist."}, _image_msg("这是什么检查？", png)]
    ref = reference(
        server,
        [{"from": "human", "value": "<image>\n这是什么检查？"}],
        (png, "image.png"),
        12,
        system="You are a radiologist.",
    )
    _check(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12), ref)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["finish_reason"]
    assert chunks[-1].usage.completion_tokens == ref["completion_tokens"] and not chunks[-1].choices
    # Several turns about a DICOM image (the image in the first user turn), max_completion_tokens.
    msgs = [
        _image_msg("描述这张CT。", dcm, "application/dicom"),
        {"role": "assistant", "content": "一张CT。"},
        {"role": "user", "content": [{"type": "text", "text": "病灶在哪里？"}]},
    ]
    turns = [
        {"from": "human", "value": "<image>\n描述这张CT。"},
        {"from": "gpt", "value": "一张CT。"},
        {"from": "human", "value": "病灶在哪里？"},
    ]
    ref = reference(server, turns, (dcm, "image.dcm"), 20)
    _check(client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=20), ref)
    # Text only, a stop string of the request's own: cut there, finish_reason stop.
    msgs = [{"role": "user", "content": "Describe a chest X-ray."}]
    full = reference(server, [{"from": "human", "value": "Describe a chest X-ray."}], None, 16)
    words = full["text"].split()
    stop = words[len(words) // 2] if len(words) > 2 else None
    if stop:
        ref = reference(server, [{"from": "human", "value": "Describe a chest X-ray."}], None, 16, stop=[stop])
        resp = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, stop=[stop])
        _check(resp, ref)
        assert stop not in resp.choices[0].message.content


def _workload():
    """16 requests: different questions, images or none, limits 3..33 tokens."""
    png = [png_bytes(s) for s in range(3)]
    qs = [
        "这是什么检查？",
        "病灶在哪里？",
        "What modality is this?",
        "请详细描述这张图像的表现和可能的诊断。",
        "Is there a fracture?",
        "肺部有结节吗？",
        "Describe the findings in detail please.",
        "正常吗？",
    ]
    reqs = []
    for i in range(16):
        q = qs[i % len(qs)]
        msgs = [_image_msg(q, png[i % 3])] if i % 4 != 3 else [{"role": "user", "content": q}]
        reqs.append(dict(model=MODEL, messages=msgs, max_tokens=3 + 2 * i))
    return reqs


def test_sixteen_concurrent_requests_equal_their_solo_answers(server, client):
    reqs = _workload()
    solo = [client.chat.completions.create(**r) for r in reqs]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: client.chat.completions.create(**r), reqs))
    for a, b, r in zip(solo, together, reqs):
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.usage == a.usage and b.choices[0].finish_reason == a.choices[0].finish_reason
        assert a.usage.completion_tokens <= r["max_tokens"]
    # and the solo answers are generate's
    r = reqs[5]
    q = r["messages"][0]["content"][1]["text"]
    ref = reference(server, [{"from": "human", "value": "<image>\n" + q}], (png_bytes(2), "image.png"), r["max_tokens"])
    _check(solo[5], ref)


def test_sampling_is_seeded_and_batch_independent(server, client):
    r = dict(
        model=MODEL,
        messages=[_image_msg("这是什么检查？", png_bytes(0))],
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
    )
    a = client.chat.completions.create(**r).choices[0].message.content
    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(
                lambda kw: client.chat.completions.create(**kw).choices[0].message.content,
                [r, dict(r, seed=1), r, dict(r, temperature=0.0), r, dict(r, seed=99)],
            )
        )
    assert outs[0] == outs[2] == outs[4] == a
    greedy = client.chat.completions.create(**dict(r, temperature=0.0)).choices[0].message.content
    assert outs[3] == greedy


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = _metric(server, "qilin_client_disconnects_total")
    cancelled = _metric(server, "qilin_finished_total", '{reason="cancelled"}')
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe the image in detail."}],
        "max_tokens": 180,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.base_url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200, resp.read()
            lines = resp.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
            assert got and json.loads(got[0][6:])["object"] == "chat.completion.chunk"
    deadline = time.time() + 30
    while time.time() < deadline and (
        server.engine.slots_in_use() or _metric(server, "qilin_client_disconnects_total") == before
    ):
        time.sleep(0.05)
    assert _metric(server, "qilin_client_disconnects_total") == before + 1
    assert _metric(server, "qilin_finished_total", '{reason="cancelled"}') == cancelled + 1
    assert server.engine.slots_in_use() == 0
    # every slot is free again: four requests at once all start at once and are answered
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(
                lambda _: client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
                ),
                range(4),
            )
        )
    assert all(o.choices[0].finish_reason in ("stop", "length") for o in outs)


def _post(server, body, *, raw=None, key=API_KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + "/v1/chat/completions", content=content, headers=headers, timeout=60)


def test_bad_input_gets_4xx_naming_the_field_and_the_server_keeps_serving(server, client):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    img = lambda url: {
        "model": MODEL,
        "max_tokens": 3,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ],
    }
    png = png_bytes(0)
    cases = [
        ("malformed JSON", None, b'{"model": "qilin-med-vl", "messages": [', 400, None, "invalid_json"),
        (
            "bad base64",
            img("data:image/png;base64,@@not base64@@"),
            None,
            400,
            "messages[0].content[0].image_url",
            "invalid_base64",
        ),
        (
            "undecodable image",
            img(data_url(b"this is not a PNG at all" * 10)),
            None,
            400,
            "messages[0].content[0].image_url",
            "invalid_image",
        ),
        (
            "bad DICOM",
            img(data_url(b"\0" * 128 + b"DICM" + b"\1" * 64, "application/dicom")),
            None,
            400,
            "messages[0].content[0].image_url",
            "invalid_image",
        ),
        (
            "remote URL",
            img("https://example.com/x.png"),
            None,
            400,
            "messages[0].content[0].image_url",
            "invalid_image_url",
        ),
        (
            "too many images",
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}] * 5
                        + [{"type": "text", "text": "?"}],
                    }
                ],
            },
            None,
            400,
            "messages",
            "too_many_images",
        ),
        ("unknown model", dict(good, model="gpt-4o"), None, 404, "model", "model_not_found"),
        ("too long", dict(good, max_tokens=250), None, 400, "max_tokens", "context_length_exceeded"),
        (
            "prompt too long",
            dict(good, messages=[{"role": "user", "content": "肺 " * 400}]),
            None,
            400,
            "messages",
            "context_length_exceeded",
        ),
        ("body over the limit", dict(good, padding="x" * (2 << 20)), None, 413, None, "request_too_large"),
        ("no messages", {"model": MODEL}, None, 400, "messages", None),
        ("bad role", dict(good, messages=[{"role": "tool", "content": "x"}]), None, 400, "messages[0].role", None),
        (
            "ends with assistant",
            dict(good, messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            None,
            400,
            "messages",
            None,
        ),
        ("bad temperature", dict(good, temperature=5), None, 400, "temperature", None),
        ("bad top_p", dict(good, top_p=0), None, 400, "top_p", None),
        ("bad max_tokens", dict(good, max_tokens=0), None, 400, "max_tokens", None),
        ("bad stop", dict(good, stop=[1, 2]), None, 400, "stop", None),
        ("n > 1", dict(good, n=2), None, 400, "n", None),
        ("not an object", [1, 2], None, 400, None, "invalid_json"),
    ]
    for name, body, raw, status, param, code in cases:
        r = _post(server, body, raw=raw)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert err["param"] == param, (name, err)
        if code:
            assert err["code"] == code, (name, err)
        if param:
            assert param in err["message"], (name, err["message"])
        assert _post(server, good).status_code == 200, name  # the next request is served
    # the openai client raises its typed errors
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=good["messages"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=good["messages"], max_tokens=10_000)
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_api_key_required(server):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key"):
        r = _post(server, good, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=good["messages"])
    assert _post(server, good).status_code == 200


def test_busy_server_answers_429_with_retry_after(server, monkeypatch):
    def full(req):
        raise QueueFull("64 requests are waiting for a slot")

    monkeypatch.setattr(server.engine, "submit", full)
    r = _post(server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_engine_queue_bound(server):
    eng = Engine(server.model, server.tokenizer, slots=1, max_len=64, prompt_buckets=[32], max_queue=2)
    ids = np.arange(3, 10, dtype=np.int32)
    for _ in range(3):  # not started: one request for the free slot, two waiting
        eng.submit(Request(ids, max_tokens=4))
    with pytest.raises(QueueFull):
        eng.submit(Request(ids, max_tokens=4))
    with pytest.raises(ValueError, match="more than the context of 64"):
        eng.check(len(ids), 60)
    assert default_buckets(512)[:8] == [16, 32, 64, 80, 96, 112, 128, 160] and default_buckets(512)[-1] == 512


def test_no_compilation_after_warmup_over_a_mixed_workload(server, client):
    eng = server.engine
    n_prefill = len(eng.buckets) * len({1, eng.prefill_batch})  # each bucket at one row and at prefill_batch rows
    assert eng._prefill._cache_size() == n_prefill and eng._decode._cache_size() == len(eng.windows)
    before = compile_count()
    png = png_bytes(4)
    reqs = [
        dict(
            model=MODEL,
            messages=[_image_msg("q" * (1 + 7 * i), png)],
            max_tokens=5 + 9 * i,
            temperature=[0.0, 0.7, 1.3][i % 3],
            top_p=[1.0, 0.8][i % 2],
            seed=i,
            stop=["。"] if i % 5 == 0 else None,
            stream=bool(i % 2),
        )
        for i in range(10)
    ]
    reqs += [
        dict(model=MODEL, messages=[{"role": "user", "content": "肺 " * (15 * i + 1)}], max_tokens=8) for i in range(6)
    ]  # text-only prompts over all three buckets

    def run(r):
        out = client.chat.completions.create(**r)
        return (
            "".join(c.choices[0].delta.content or "" for c in out if c.choices)
            if r["stream"] is True
            else out.choices[0].message.content
        )

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(run, [dict(r, stream=r.get("stream", False)) for r in reqs]))
    assert len(answers) == len(reqs)
    assert compile_count() == before
    assert eng._prefill._cache_size() == n_prefill and eng._decode._cache_size() == len(eng.windows)


def test_models_health_metrics_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server.base_url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4 and h["max_context"] == 256
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "qilin_requests_total",
        "qilin_completion_tokens_total",
        "qilin_queue_depth",
        "qilin_slots_in_use",
        "qilin_time_to_first_token_seconds_bucket",
        "qilin_request_latency_seconds_bucket",
    ):
        assert name in text, name
    assert _metric(server, "qilin_requests_total", '{status="200"}') > 0
    page = httpx.get(server.base_url + "/").text
    assert '<script src="/static/app.js">' in page and "http" not in page.replace("http-equiv", "")
    js = httpx.get(server.base_url + "/static/app.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text
    assert httpx.get(server.base_url + "/static/../api.py").status_code == 404
    prev = httpx.post(
        server.base_url + "/v1/preview",
        json={"image_url": data_url(dicom_bytes(), "application/dicom")},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    assert prev["preview"].startswith("data:image/png;base64,") and prev["size"] == 32
