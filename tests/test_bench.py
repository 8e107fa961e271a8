"""The benchmark scripts run end to end on a tiny config and print their JSON.

Speed is never asserted here (benchmarks measure it); these tests keep the scripts working:
bench/train_step.py on CPU with the CPU settings and with the GPU code path (bf16 compute,
torch autocast, full remat; attention forced to XLA, as cuDNN needs a GPU), its per-platform
settings for every bench config, and bench/generate.py's figures, greedy-token agreement with
torch and its roofline fields, bench/loop_overheads.py (checkpoint and host-sync costs),
bench/decode_layout.py (the two decode weight layouts give the same tokens), bench/shared_prefix.py
and bench/optimizer.py (GuardedAdamW and the optax chain give the same parameters).
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import generate as G  # noqa: E402
from bench import train_step as B  # noqa: E402

TINY_BENCH = """
model:
  preset: qilin_med_vl_13b
  overrides:
    vision: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
             image_size: 28, patch_size: 14}
    text: {vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 256}
    image_token_id: 511
platform:
  cpu: {dtype: float32, attention: xla, remat: save_dots, loss_chunk: 8, loss_supervised_only: true}
  gpu: {dtype: bfloat16, attention: cudnn, remat: full, loss_chunk: 16}
batch: {rows: 2, text_tokens: 12, pad_last_row: 3}
repeats: 1
"""
CONTRACT = ("stage1_step_s", "stage2_step_s", "torch_stage2_step_s", "stage2_speedup_vs_torch", "mfu")


@pytest.fixture
def tiny_bench(tmp_path):
    p = tmp_path / "tiny_bench.yaml"
    p.write_text(TINY_BENCH)
    return str(p)


def _run(main, argv, capsys) -> dict:
    main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines  # one JSON line, one summary line
    return json.loads(lines[0])


def _check_train_step(out: dict):
    for key in CONTRACT:
        assert key in out and out[key] > 0, key
    for s in ("stage1", "stage2"):
        assert out[f"{s}_speedup_vs_torch"] == pytest.approx(
            out[f"torch_{s}_step_s"] / out[f"{s}_step_s"], rel=2e-3
        )  # ratio to 3 places, times to 1 us
        # Random init on both sides: the loss of a 512-token vocabulary starts near ln(512).
        for pre in ("", "torch_"):
            assert abs(out[f"{pre}{s}_loss"] - math.log(512)) < 1.0, (pre, s, out[f"{pre}{s}_loss"])
    # stage 2 also trains the LLM: more FLOPs than stage 1 (frozen LLM, no weight gradients)
    assert out["step_flops"]["stage2"] > out["step_flops"]["stage1"]
    assert out["mfu"] == out["stage2_mfu"]


def test_train_step_bench_cpu_settings(tiny_bench, capsys):
    out = _run(B.main, ["--config", tiny_bench, "--repeats", "1", "--matmul-n", "128"], capsys)
    _check_train_step(out)
    assert (out["settings"], out["dtype"], out["remat"], out["loss_chunk"]) == ("cpu", "float32", "save_dots", 8)
    assert out["loss_supervised_only"] is True
    # labels on the text tokens only: 12 in the first row, 12 - 3 padded in the second
    assert out["supervised_tokens"] == 12 + (12 - 3)


def test_train_step_bench_gpu_path_on_cpu(tiny_bench, capsys):
    out = _run(
        B.main,
        [
            "--config",
            tiny_bench,
            "--repeats",
            "1",
            "--matmul-n",
            "128",
            "--settings",
            "gpu",
            "--override",
            "attention=xla",
        ],
        capsys,
    )
    _check_train_step(out)
    assert (out["settings"], out["dtype"], out["attention"], out["remat"]) == ("gpu", "bfloat16", "xla", "full")
    assert out["peak_dtype"] == "bfloat16"


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs/bench").glob("*.yaml")))
def test_bench_configs_settings_per_platform(path):
    for plat in ("cpu", "gpu", "tpu"):
        cfg, raw = B.load_bench_config(path, plat)
        settings = raw["platform"][plat]
        for key, value in settings.items():
            assert getattr(cfg, key) == value, (plat, key)
        b = raw["batch"]
        batch = B.make_batch(cfg, b["rows"], b["text_tokens"], b.get("pad_last_row", 0))
        assert batch["input_ids"].shape == (b["rows"], 1 + cfg.image_tokens + b["text_tokens"])
        assert (batch["input_ids"][:, 1 : 1 + cfg.image_tokens] == cfg.image_token_id).all()
    gpu, _ = B.load_bench_config(path, "gpu")
    assert (gpu.dtype, gpu.attention) == ("bfloat16", "cudnn")
    cfg, _ = B.load_bench_config(path, "gpu", B.parse_overrides(["attention=xla", "loss_chunk=64"]))
    assert (cfg.attention, cfg.loss_chunk) == ("xla", 64)


def test_bench_config_errors(tiny_bench):
    with pytest.raises(SystemExit, match="no `platform: tpu:`"):
        B.load_bench_config(tiny_bench, "tpu")
    with pytest.raises(SystemExit, match="unknown compute setting"):
        B.load_bench_config(tiny_bench, "cpu", {"atention": "xla"})
    with pytest.raises(SystemExit, match="key=value"):
        B.parse_overrides(["attention"])


def test_generate_bench_tiny(capsys):
    out = _run(
        G.main,
        ["--models", "tiny", "--new-tokens", "4", "--repeats", "1", "--torch-threads", "1", "--bandwidth-mb", "16"],
        capsys,
    )
    for key in ("decode_tokens_per_s", "torch_decode_tokens_per_s", "decode_ratio_vs_torch"):
        assert out[key] > 0, key
    tiny = out["models"]["tiny"]
    assert tiny["greedy_tokens_equal_rows"] == 1.0  # same weights, same prompt: same greedy tokens
    assert out["decode_ratio_vs_torch"] == pytest.approx(
        tiny["decode_tokens_per_s"] / tiny["torch_decode_tokens_per_s"], rel=1e-3
    )
    # The bytes a decode step reads, counted from the config (float32): every layer's
    # projections and norms, the final norm and the untied LM head.
    t = G.model_config("tiny").text
    hd = t.head_dim
    layer = (
        t.hidden_size * t.num_attention_heads * hd * 2
        + t.hidden_size * t.num_key_value_heads * hd * 2
        + 3 * t.hidden_size * t.intermediate_size
        + 2 * t.hidden_size
    )
    expected = 4 * (t.num_hidden_layers * layer + t.hidden_size + t.hidden_size * t.vocab_size)
    assert tiny["decode_weight_bytes"] == expected
    bw = out["memory_bandwidth_gb_per_s"]
    assert bw == max(max(r.values()) for r in out["memory_bandwidth_runs"])
    assert out["decode_roofline_tokens_per_s"] == pytest.approx(bw * 1e9 / expected, rel=1e-2)
    assert out["decode_ratio_bound_vs_torch"] == pytest.approx(
        out["decode_roofline_tokens_per_s"] / out["torch_decode_tokens_per_s"], rel=1e-2
    )


def test_loop_overheads_bench_tiny(tiny_bench, tmp_path, capsys):
    from bench import loop_overheads as O

    ckdir = tmp_path / "ckpts"
    out = _run(
        O.main,
        ["--config", tiny_bench, "--steps", "2", "--save-every", "1", "--repeats", "1", "--dir", str(ckdir)],
        capsys,
    )
    assert out["saves"] == 2 and out["state_mb"] > 0
    assert set(out["seconds"]) == set(O.VARIANTS)
    for key in ("async_save_cost_per_save_s", "sync_save_cost_per_save_s", "sync_every_step_cost_per_step_s"):
        assert key in out
    assert list(ckdir.iterdir()) == []  # every variant's checkpoints were written, then removed
    with pytest.raises(SystemExit, match="unknown variant"):
        O.main(["--config", tiny_bench, "--variants", "no_save,fast"])


def test_decode_layout_bench_tiny(capsys):
    from bench import decode_layout as D

    # 128 tokens, best of 3: the tiny model decodes a token in ~50 us, so fewer tokens leave
    # tN - t1 within the jitter of one call
    out = _run(D.main, ["--models", "tiny", "--new-tokens", "128", "--repeats", "3"], capsys)
    r = out["models"]["tiny"]
    assert r["greedy_tokens_equal"] is True  # the two layouts compute the same model
    for v in D.LAYOUTS:
        assert r[v]["decode_tokens_per_s"] > 0 and r[v]["prefill_s"] > 0
    assert r["decode_out_in_over_in_out"] == pytest.approx(
        r["out_in"]["decode_tokens_per_s"] / r["in_out"]["decode_tokens_per_s"], rel=1e-2
    )
    with pytest.raises(SystemExit, match="new-tokens"):
        D.main(["--models", "tiny", "--new-tokens", "1"])


def test_shared_prefix_bench_tiny(tmp_path, capsys):
    """bench/shared_prefix.py on the tiny two-stage training config: the plain-template stage
    is skipped, the v1 stage compares whole rows with the 45-token preamble shared, and the
    two first losses agree (the prefix path is exact)."""
    from bench import shared_prefix as SP
    from tests import train_helpers as H

    data = H.make_data(tmp_path / "data", n_align=8, n_instruct=8)
    cfg = H.write_config(tmp_path / "cfg.yaml", H.base_config(data, tmp_path / "runs", steps=(2, 2)))
    out = _run(SP.main, ["--config", str(cfg), "--repeats", "1", "--steps", "1"], capsys)
    assert "skipped" in out["stages"]["stage1"]
    r = out["stages"]["stage2"]
    assert r["prefix_tokens"] == 45 and r["rows_after_cut"] == r["row_tokens"] - 45
    assert r["shared_step_s"] > 0 and r["whole_step_s"] > 0
    assert r["shared_over_whole"] == pytest.approx(r["shared_step_s"] / r["whole_step_s"], rel=1e-2)
    assert r["first_loss_shared"] == pytest.approx(r["first_loss_whole"], rel=1e-5)
    with pytest.raises(SystemExit, match="unknown stage"):
        SP.main(["--config", str(cfg), "--stages", "stage9"])


def test_optimizer_bench_tiny(tiny_bench, capsys):
    """bench/optimizer.py on the tiny config: both updates run, give the same parameters bit for
    bit, and the guarded one makes no whole-array copies of the optimizer state."""
    from bench import optimizer as O

    out = _run(O.main, ["--config", tiny_bench, "--repeats", "1"], capsys)
    assert out["same_result"] is True
    assert out["trainable_params"] > 0 and out["guarded_s"] > 0 and out["reference_s"] > 0
    assert out["guarded_over_reference"] == pytest.approx(out["guarded_s"] / out["reference_s"], rel=1e-2)
    assert out["memory"]["guarded"]["copies"] == 0
    out1 = _run(O.main, ["--config", tiny_bench, "--repeats", "1", "--stage", "stage1"], capsys)
    assert 0 < out1["trainable_params"] < out["trainable_params"]
