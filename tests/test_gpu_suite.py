"""bench/gpu_suite.sh --dry-run: every part of the GPU suite (env, parity, train step, 13B decode)
runs at tiny sizes on the CPU and writes the JSON a GPU run writes, with numbers where the GPU
run will have them, so a GPU's first minute is not spent on a typo. Also: a part that fails
records its error in the JSON and the suite still writes it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_suite as S  # noqa: E402

MEMORY_KEYS = {
    "jax_peak_bytes",
    "jax_bytes_limit",
    "torch_peak_bytes",
    "torch_peak_reserved_bytes",
    "host_peak_rss_bytes",
}


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device per part, as on the GPU host
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run(
        [str(ROOT / "bench/gpu_suite.sh"), "--dry-run", "--out", str(out)],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("_cpu_dry-run.json"), files
    return json.loads(files[0].read_text())


def test_every_part_ran_and_recorded_memory(dry_run):
    assert dry_run["dry_run"] is True and dry_run["device_kind"] == "cpu"
    assert list(dry_run["parts"]) == list(S.PARTS) and dry_run["errors"] == []
    assert dry_run["spec"] == {
        "name": "NVIDIA H200 SXM",
        "bf16_dense_tflops": 989.0,
        "hbm_bytes_per_s": 4.8e12,
        "hbm_bytes": 141e9,
    }
    for name, part in dry_run["parts"].items():
        assert part["error"] is None and part["timed_out"] is False and part["returncode"] == 0, (name, part)
        assert _number(part["wall_s"]) and part["wall_s"] <= part["limit_s"]
        assert set(part["memory"]) == MEMORY_KEYS, name
        assert part["memory"]["host_peak_rss_bytes"] > 50e6, name
        # CPU: no device memory statistics, no CUDA
        assert part["memory"]["jax_peak_bytes"] is None and part["memory"]["torch_peak_bytes"] is None


def test_env_part(dry_run):
    env = dry_run["parts"]["env"]["result"]
    assert env["platform"] == "cpu" and env["torch_cuda_available"] is False
    for key in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        assert isinstance(env[key], str) and env[key][0].isdigit(), key


def test_parity_part_records_every_error_with_its_limit(dry_run):
    p = dry_run["parts"]["parity"]["result"]
    assert p["torch_device"] == "cpu" and p["bf16_attention"] == "xla"  # cudnn on a GPU
    assert p["llama_variants"] == ["gqa"]  # the dry run's subset; a GPU run checks all three
    expected = {
        "clip_hidden_states_max_rel",
        "llava_logits_rel",
        "llava_loss_rel",
        "llava_grads_max_rel",
        "llava_bf16_logits_rel_vs_fp32_torch",
        "llama_gqa_logits_rel",
        "llama_gqa_loss_rel",
        "llama_gqa_grads_max_rel",
    }
    assert set(p["checks"]) == expected
    for name, c in p["checks"].items():
        assert _number(c["max_rel_err"]) and c["max_rel_err"] >= 0, name
        assert (
            c["limit"] == S.PARITY_LIMITS[name if not name.startswith("llama_") else "llama_" + name.split("_", 2)[2]]
        )
        assert c["ok"] is True, (name, c)
    assert p["checks"]["llava_bf16_logits_rel_vs_fp32_torch"]["limit"] == 2e-2
    # bf16 logits are ~1e-2 off float32, float32 ~1e-7: the two checks measure different things
    bf16 = p["checks"]["llava_bf16_logits_rel_vs_fp32_torch"]["max_rel_err"]
    assert bf16 > 100 * p["checks"]["llava_logits_rel"]["max_rel_err"]
    assert p["all_within_limits"] is True


def test_train_step_part_has_mfu_against_the_peak(dry_run):
    r = dry_run["parts"]["train_step"]["result"]
    for key in ("stage1_step_s", "stage2_step_s", "torch_stage2_step_s", "stage2_speedup_vs_torch", "mfu"):
        assert _number(r[key]) and r[key] > 0, key
    # the GPU settings of configs/bench/gpu_13b_wide.yaml, attention forced to XLA on a CPU
    assert (r["settings"], r["dtype"], r["remat"], r["attention"]) == ("gpu", "bfloat16", "full", "xla")
    v = r["vs_peak"]
    assert v["peak_tflops"] == S.H200_BF16_DENSE_TFLOPS
    tokens = r["batch"] * r["seq"]
    for s in ("stage1", "stage2"):
        assert v[f"{s}_mfu"] == pytest.approx(r["step_flops"][s] / r[f"{s}_step_s"] / 989e12, rel=1e-3)
        assert v[f"torch_{s}_mfu"] == pytest.approx(
            r["step_flops_all_positions"][s] / r[f"torch_{s}_step_s"] / 989e12, rel=1e-3
        )
        assert v[f"{s}_tokens_per_s"] == pytest.approx(tokens / r[f"{s}_step_s"], rel=1e-3)
        assert v[f"{s}_mfu"] > 0 and v[f"torch_{s}_mfu"] > 0


def test_decode_part_has_both_batches_and_the_roofline(dry_run):
    d = dry_run["parts"]["decode"]["result"]
    assert d["size"] == "tiny" and d["dtype"] == "bfloat16" and d["torch_device"] == "cpu"
    assert d["hbm_bytes_per_s_source"].startswith("measured") and d["hbm_bytes_per_s"] > 1e8
    t, T, N = d["text"], d["prompt_tokens"], d["new_tokens"]
    assert set(d["batches"]) == {"1", "16"}
    for b, row in d["batches"].items():
        B = int(b)
        for key in (
            "decode_tokens_per_s",
            "torch_decode_tokens_per_s",
            "prefill_tokens_per_s",
            "torch_prefill_tokens_per_s",
            "decode_fraction_of_roofline",
            "torch_decode_fraction_of_roofline",
            "decode_ratio_vs_torch",
        ):
            assert _number(row[key]) and row[key] > 0, (b, key)
        head_dim = t["hidden_size"] // t["num_attention_heads"]
        kv = 2 * t["num_hidden_layers"] * B * (T + N / 2) * t["num_key_value_heads"] * head_dim * 2  # bf16
        assert row["kv_cache_bytes_per_step"] == int(kv)
        assert row["bytes_per_step"] == d["weight_bytes"] + row["kv_cache_bytes_per_step"]
        assert row["roofline_tokens_per_s"] == pytest.approx(B * d["hbm_bytes_per_s"] / row["bytes_per_step"], rel=1e-3)
        assert row["decode_fraction_of_roofline"] == pytest.approx(
            row["decode_tokens_per_s"] / row["roofline_tokens_per_s"], rel=1e-3
        )
        assert d[f"decode_tokens_per_s_b{b}"] == pytest.approx(row["decode_tokens_per_s"], rel=1e-3)


def test_serve_part_compares_the_engine_with_torch_one_by_one(dry_run):
    r = dry_run["parts"]["serve"]["result"]
    assert r["bench"] == "serve" and r["model"] == "tiny" and r["torch_device"] == "cpu"
    for c in (1, 4, 16):
        assert _number(r[f"decode_tokens_per_s_c{c}"]) and r[f"decode_tokens_per_s_c{c}"] > 0
    assert r["scaling_16_vs_1"] == pytest.approx(r["decode_tokens_per_s_c16"] / r["decode_tokens_per_s_c1"], rel=1e-2)
    assert r["throughput_ratio_vs_torch_sequential"] == pytest.approx(
        r["decode_tokens_per_s_c16"] / r["torch_sequential_tokens_per_s"], rel=1e-2
    )
    assert r["compilations_after_ready"] == 0 and all(r["greedy_equal_generate"])


def test_h200_constants_match_the_mfu_table():
    from qilin_jax.train.flops import PEAK_TFLOPS

    assert S.H200_BF16_DENSE_TFLOPS == PEAK_TFLOPS["h200"]
    assert S.HBM_BYTES_PER_S["h200"] == 4.8e12
    assert sum(S.LIMITS_S.values()) <= S.BUDGET_S <= 8 * 60


def test_a_failing_part_is_recorded_and_the_suite_writes_its_json(tmp_path):
    # Without --dry-run the suite insists on a GPU: on this CPU the env part fails, and the
    # JSON still comes out with the error (and the next part still runs).
    out = tmp_path / "real.json"
    proc = subprocess.run(
        [str(ROOT / "bench/gpu_suite.sh"), "--parts", "env,parity", "--out", str(out)],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["dry_run"] is False and data["errors"] == ["env", "parity"]
    env, parity = data["parts"]["env"], data["parts"]["parity"]
    # env keeps what it found (the versions say why there is no GPU); parity fails before any work
    assert "not the GPU" in env["error"] and env["result"]["platform"] == "cpu" and env["returncode"] == 1
    assert "not the GPU" in parity["error"] and parity["result"] is None and "RuntimeError" in parity["traceback"]
    assert parity["memory"]["host_peak_rss_bytes"] > 0


def test_decode_weights_start_like_the_models_own_init():
    """bench/decode_13b.py draws the 13B weights on the device parameter by parameter; its
    constants (norms 1, biases 0) sit where the model's initialiser puts them."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from bench.decode_13b import init_on_device, model_config
    from qilin_jax.models import QilinMedVL

    cfg = model_config("tiny")
    ours = jax.tree_util.tree_flatten_with_path(nnx.state(init_on_device(cfg)))[0]
    ref = jax.tree_util.tree_flatten_with_path(
        nnx.state(QilinMedVL(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0)))
    )[0]
    assert [p for p, _ in ours] == [p for p, _ in ref]
    constants = 0
    for (path, a), (_, b) in zip(ours, ref):
        assert a.dtype == np.dtype("bfloat16") and a.shape == b.shape, path
        a, b = np.asarray(a, np.float32), np.asarray(b)
        if (b == b.flat[0]).all():
            constants += 1
            assert (a == b.flat[0]).all(), path
        else:
            assert 0.01 < a.std() < 0.03 and abs(a.mean()) < 0.01, (path, a.std())
    assert constants == 19  # 5 in the LLM and adapter, 14 in the vision tower (tiny preset)
