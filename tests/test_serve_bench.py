"""bench/serve.py runs end to end on the tiny model and prints its JSON (speed is not asserted:
the benchmark measures it): the contract keys, greedy answers equal to `generate` and to
torch's, nothing compiled after warm-up."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import serve as S  # noqa: E402

CONTRACT = (
    "decode_tokens_per_s_c1",
    "decode_tokens_per_s_c4",
    "decode_tokens_per_s_c16",
    "ttft_p50_s",
    "ttft_p95_s",
    "scaling_16_vs_1",
    "throughput_ratio_vs_torch_sequential",
)


def test_serve_bench_tiny(capsys):
    S.main(["--tiny", "--torch-threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-2])
    assert res["bench"] == "serve" and res["model"] == "tiny"
    for k in CONTRACT:
        assert isinstance(res[k], float) and res[k] > 0, k
    assert res["ttft_p95_s"] >= res["ttft_p50_s"]
    assert res["greedy_equal_generate"] == [True] * 4 and res["greedy_equal_torch_rows"] == 1.0
    assert res["compilations_after_ready"] == 0
    assert lines[-1].startswith("serve tiny: ")


def test_serve_bench_reports_its_compute_floor(capsys):
    S.main(["--tiny", "--torch-threads", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert res["matmul_gflops"] > 0 and res["flops_c16"] > 0
    assert res["compute_floor_s_c16"] * res["matmul_gflops"] * 1e9 == pytest.approx(res["flops_c16"], rel=1e-2)
    assert res["throughput_ratio_ceiling"] == pytest.approx(res["torch_seconds"] / res["compute_floor_s_c16"], rel=2e-2)
    assert res["compute_share_c16"] == pytest.approx(res["compute_floor_s_c16"] / res["wall_s"]["16"], rel=2e-2)


def test_generate_flops_counts_every_decoder_matrix_once_per_new_token():
    """One more new token costs 2 FLOPs per matrix parameter of the decoder and LM head (counted
    from the model's own parameter shapes) plus QK^T and AV over the context so far."""
    from flax import nnx

    from qilin_jax.models import QilinMedVL, model_preset
    from qilin_jax.train.flops import generate_flops

    cfg = model_preset("tiny")
    llm = nnx.state(nnx.eval_shape(lambda: QilinMedVL(cfg, rngs=nnx.Rngs(0))).llm, nnx.Param).to_pure_dict()
    matrices = sum(x.size for k, x in llm["layers"].items() if k.endswith("_proj")) + llm["lm_head"].size
    t = cfg.text
    attn_per_key = 4 * t.num_hidden_layers * t.num_attention_heads * t.head_dim
    T, N = 20, 7
    step = generate_flops(cfg, T, N + 1, 1) - generate_flops(cfg, T, N, 1)
    assert step == 2 * matrices + attn_per_key * (T + N)  # the new step attends to T + N positions
    # the prefill alone (one new token) grows with the prompt by the same matrices per position
    assert generate_flops(cfg, T + 1, 1, 1) - generate_flops(cfg, T, 1, 1) == pytest.approx(
        2 * (matrices - llm["lm_head"].size) + attn_per_key * (2 * T + 1) / 2
    )
