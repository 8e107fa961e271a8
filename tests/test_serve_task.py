"""`python main.py --config configs/serve.yaml` (the `serve` task): a one-line error without the
checkpoint; with one, it serves on the configured port until interrupted, then prints
`run folder: <path>`."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user runs it
    return env


def test_missing_checkpoint_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config",
            "configs/serve.yaml",
            f"serve.checkpoint={tmp_path / 'nope'}",
            f"output_dir={tmp_path}",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"serve.checkpoint '{tmp_path / 'nope'}' has no checkpoint (config.json): run the demo first "
        "(python main.py --config configs/demo.yaml) or set serve.checkpoint=PATH"
    )


def test_serve_task_serves_until_interrupted(tmp_path):
    from qilin_jax import checkpoint
    from tests.infer_fixtures import random_model, tiny_config

    cfg = tiny_config()
    checkpoint.save_pretrained(random_model(cfg, seed=0), cfg, tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--config",
            "configs/serve.yaml",
            f"serve.checkpoint={tmp_path / 'ckpt'}",
            f"serve.port={port}",
            "serve.slots=2",
            "serve.max_context=128",
            "serve.prompt_buckets=[64]",
            f"output_dir={tmp_path}",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the server did not become healthy")
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=60,
            json={"model": "qilin-med-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "你好"}]},
        )
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"run folder: {tmp_path / 'demo_serve'}"
