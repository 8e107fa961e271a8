"""Shared helpers for the training robustness tests (resume, kill, NaN, multi-process).

`make_data(dir)` generates a small demo data set; `write_config(tmp_path, ...)` writes a tiny
two-stage run config (toy model, every step logged, a checkpoint every 3 steps, async saves)
into tmp_path; `run_main(...)` runs `python main.py --config ...` in a subprocess with a
chosen CPU device count and the fault-injection hooks of tests/train_launcher.py;
`read_metrics(run_dir)` reads metrics.jsonl.

Subprocess runs are compared with each other only (same environment, same device count),
so their losses are bit-identical when the code is deterministic.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

_DATA_CACHE: dict[str, Path] = {}


def make_data(out: Path, *, n_align: int = 48, n_instruct: int = 48) -> Path:
    """A small demo data set in `out` (images at the tiny model's 32 px), generated once per
    pytest session and directory."""
    out = Path(out)
    if (out / "meta.json").exists():
        return out
    from qilin_jax.demo_data.make_demo import generate

    generate(out, n_align=n_align, n_instruct=n_instruct, n_heldout=8, image_size=32, n_csv=0)
    return out


def make_model(out: Path) -> Path:
    """A tiny random model (the demo tokenizer's vocabulary) saved with save_pretrained, as
    `model.checkpoint` of the test runs: loading it is much cheaper than compiling the
    random initialisation in every subprocess (tens of seconds of CPU for jit(init))."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    from qilin_jax.checkpoint import save_pretrained
    from tests.infer_fixtures import random_model, tiny_config

    cfg = tiny_config()
    save_pretrained(random_model(cfg, seed=0), cfg, out, overwrite=True)
    return out


def base_config(
    data_dir: Path,
    out_dir: Path,
    *,
    name: str = "run",
    steps=(6, 6),
    every_steps: int = 3,
    buckets=(128,),
    batch_size: int = 4,
) -> dict:
    """The raw YAML dict of a tiny curriculum: stage1 (adapter, alignment captions) then stage2
    (LLM + adapter, instruction data); steps[i] = max_steps of stage i+1, None drops the stage.
    One sequence bucket by default: one compiled step per stage."""
    data_dir = Path(data_dir)
    stages = [
        {"name": "stage1", "trainable": ["adapter/.*"], "learning_rate": 1.0e-3, "max_steps": steps[0]},
        {
            "name": "stage2",
            "trainable": ["llm/.*", "adapter/.*"],
            "learning_rate": 2.0e-4,
            "max_steps": steps[1],
            "data": {"paths": [str(data_dir / "instruction.json")], "template": "v1", "image_mode": "pad"},
        },
    ]
    stages = [s for s, n in zip(stages, steps) if n is not None]
    return {
        "name": name,
        "output_dir": str(out_dir),
        "tasks": ["train"],
        "model": {
            "preset": "tiny",
            "tokenizer": str(REPO / "qilin_jax" / "demo_data" / "tokenizer"),
            "overrides": {"text": {"vocab_size": 4000}, "image_token_id": 4000},
            "checkpoint": str(make_model(data_dir / "model")),
        },
        "data": {
            "format": "llava_json",
            "paths": [str(data_dir / "alignment.json")],
            "image_folder": str(data_dir / "images"),
            "template": "plain",
            "image_mode": "square",
            "max_length": max(buckets),
            "batch_size": batch_size,
            "seq_buckets": list(buckets),
            "shuffle": True,
            "seed": 0,
        },
        "stages": stages,
        "checkpoint": {"every_steps": every_steps, "keep": 3, "async_save": True},
        "logging": {"every_steps": 1, "tensorboard": False, "jsonl": True, "progress_bar": False},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    }


def write_config(path: Path, raw: dict) -> Path:
    """Write a raw config dict as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# A persistent XLA compilation cache shared by the subprocesses of one pytest session: the
# first run of a config compiles (~20 s of CPU for the tiny model), later runs load the
# same executables (~1 s), so a test can afford several kill/resume runs.
_COMPILE_CACHE: list[str] = []


def compile_cache_dir() -> str:
    if not _COMPILE_CACHE:
        import atexit
        import shutil
        import tempfile

        _COMPILE_CACHE.append(tempfile.mkdtemp(prefix="qilin_test_xla_cache_"))
        atexit.register(shutil.rmtree, _COMPILE_CACHE[0], ignore_errors=True)
    return _COMPILE_CACHE[0]


def subprocess_env(devices: int, **extra: str) -> dict:
    """The environment of a training subprocess: CPU only, `devices` host devices, the shared
    compilation cache, the launcher's hook variables from `extra`."""
    env = dict(os.environ)
    for k in ("QILIN_TEST_KILL_AT", "QILIN_TEST_NAN_AT"):
        env.pop(k, None)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=compile_cache_dir(),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def main_cmd(config: Path, *overrides: str) -> list[str]:
    """main.py's command line, through tests/train_launcher.py (main.py plus the hooks that
    QILIN_TEST_KILL_AT / QILIN_TEST_NAN_AT in the subprocess's environment ask for)."""
    return [sys.executable, "-m", "tests.train_launcher", "--config", str(config), *overrides]


def run_main(
    config: Path, *overrides: str, devices: int = 1, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """Run main.py to completion (or death) in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        main_cmd(config, *overrides),
        cwd=REPO,
        env=subprocess_env(devices, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of <run_dir>/metrics.jsonl, in the order written (resumed runs append)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# The metrics a step determines (not timings).
STEP_KEYS = ("loss", "grad_norm", "lr", "tokens", "finite")


def by_step(rows: list[dict], keys=STEP_KEYS) -> dict[tuple[str, int], dict]:
    """{(stage, step): {key: value}}; a step logged twice (before a kill and again after the
    resume) must have logged exactly the same values both times."""
    out: dict = {}
    for r in rows:
        key = (r["stage"], r["step"])
        vals = {k: r[k] for k in keys}
        if key in out:
            assert out[key] == vals, f"{key} logged twice with different values: {out[key]} vs {vals}"
        out[key] = vals
    return out


def losses(rows: list[dict]) -> dict[tuple[str, int], float]:
    """{(stage, step): loss} (see by_step)."""
    return {k: v["loss"] for k, v in by_step(rows).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_entries(run_dir: Path, stage: str) -> list[str]:
    """Names in <run>/<stage>/checkpoints (finished steps and Orbax temporary directories)."""
    d = Path(run_dir) / stage / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def final_params(run_dir: Path, stage: str) -> dict:
    """{path: numpy array} of <run>/<stage>/final (what save_pretrained wrote)."""
    import jax
    import numpy as np
    from flax import nnx

    import qilin_jax

    model = qilin_jax.load_pretrained(str(Path(run_dir) / stage / "final"))
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_same_training(run: Path, ref_run: Path, stage: str = "stage2") -> None:
    """Two runs trained the same rows to the same result: every logged step with the same
    token count and learning rate, losses and gradient norms within 1e-5, and the final
    parameters of `stage` within 1e-5 (float summation order may differ between them)."""
    import numpy as np

    got, want = by_step(read_metrics(run)), by_step(read_metrics(ref_run))
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        assert got[key]["tokens"] == want[key]["tokens"], key  # the same rows
        assert got[key]["lr"] == want[key]["lr"], key
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[key][k], want[key][k], rtol=1e-5, err_msg=f"{key} {k}")
    a, b = final_params(run, stage), final_params(ref_run, stage)
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
