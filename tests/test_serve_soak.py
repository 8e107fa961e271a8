"""A bounded soak on loopback: 300 requests at concurrency 16 (text and images, plain and
streamed, greedy and sampled): none lost, no 5xx, the process's memory steady."""

import concurrent.futures as cf

import httpx
import psutil

from tests.serve_fixtures import client, data_url, png_bytes, server  # noqa: F401

MODEL = "qilin-med-vl"


def test_soak_300_requests_at_concurrency_16(server, client):
    images = [data_url(png_bytes(s)) for s in range(4)]

    def one(i: int):
        content = f"问题 {i}: 这张图像显示了什么？" if i % 2 else f"question {i}"
        if i % 3 == 0:
            content = [{"type": "image_url", "image_url": {"url": images[i % 4]}}, {"type": "text", "text": content}]
        kw = dict(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=2 + i % 7,
            temperature=0.8 if i % 4 == 1 else 0.0,
            seed=i,
        )
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            return [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return client.chat.completions.create(**kw).choices[0].finish_reason

    proc = psutil.Process()
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(32)))  # warm the allocators and connection pools
        rss0 = proc.memory_info().rss
        reasons = list(pool.map(one, range(300)))
        rss1 = proc.memory_info().rss
    assert len(reasons) == 300 and all(r in ("stop", "length") for r in reasons), reasons
    text = httpx.get(server.base_url + "/metrics").text
    assert 'qilin_requests_total{status="5' not in text
    assert server.engine.slots_in_use() == 0 and server.engine.queue_depth() == 0
    print(f"soak: 300 requests at concurrency 16, RSS {rss0 / 2**20:.0f} MB before, {rss1 / 2**20:.0f} MB after")
    assert rss1 - rss0 < 150 * 2**20, (rss0, rss1)
