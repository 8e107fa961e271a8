"""The package as a user installs it: build a wheel, install it into a fresh venv, run a
shortened demo from a folder outside the checkout through the installed `qilin-jax` command
(the demo generator, its tokenizer and the config all come from the wheel)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not copied into the build tree: outputs and local state, never part of a wheel.
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "generated",
    "tmp",
)
# The demo cut to one stage of 2 steps: every task of the demo runs (data, the shipped
# backbones checked and converted, training, checkpoint, eval, chat on a DICOM slice,
# report), in about a minute.
SHORT_DEMO = [
    "demo.n_align=64",
    "demo.n_instruct=64",
    "demo.n_heldout=20",
    "demo.n_csv=4",
    'stages=[{name: stage2, trainable: ["llm/.*", "adapter/.*"], max_steps: 2, data: {batch_size: 8, '
    "paths: [data/demo/generated/instruction.json], template: v1, image_mode: pad, seq_buckets: [128]}}]",
    "train.shared_prefix=false",
    "eval.limit=8",
    "eval.batch_size=8",
    "chat.max_new_tokens=4",
    "checkpoint.async_save=false",
    "logging.progress_bar=false",
]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path):
    # Build from a copy so the checkout gets no build/ or egg-info (and tests may run in parallel).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORED)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "wheel"),
            str(src),
        ],
        tmp_path,
        env,
    )
    (wheel,) = (tmp_path / "wheel").glob("qilin_jax-*.whl")
    # The venv sees the installed dependencies (jax etc.), so nothing is downloaded.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # The wheel's package, not the checkout (nor an editable install of it), is what runs.
    where = _run(
        [str(py), "-c", "import qilin_jax, qilin_jax.demo_data; print(qilin_jax.__file__)"], outside, env
    ).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO), where
    # A config error names the key, from the installed package too.
    bad = subprocess.run(
        [str(bindir / "qilin-jax"), "--config", "demo", "eval.batch_size=abc"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "eval.batch_size: expected int" in bad.stderr, bad.stderr[-2000:]

    out = _run([str(bindir / "qilin-jax"), "--config", "demo", *SHORT_DEMO], outside, env, timeout=900)
    last = out.strip().splitlines()[-1]
    assert last.startswith("run folder: ")
    run = Path(last.split(": ", 1)[1])
    assert run.resolve().is_relative_to(outside.resolve()), run  # relative paths: the working folder
    assert (outside / "data" / "demo" / "generated" / "heldout.json").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["stages"][0]["name"] == "stage2" and report["stages"][0]["steps"] == 2
    assert set(report["heldout_accuracy_by_type"]) == {"location", "modality", "count", "size", "choice"}
    assert report["chat_answer"] is not None
    assert (run / "stage2" / "final" / "config.json").exists()
    # The pretrained backbones ship in the wheel and went through the converter.
    assert json.loads((run / "pretrained" / "conversion.json").read_text())["sources"]["vision"]["format"] == "hf-clip"
    # The resolved config names the tokenizer inside the installed package.
    assert "site-packages" in (run / "config.yaml").read_text()
