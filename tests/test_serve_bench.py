"""bench/serve.py runs end to end on the tiny model and prints its JSON (speed is not asserted:
the benchmark measures it): the contract keys, greedy answers equal to `generate` and to
torch's, nothing compiled after warm-up."""

import json
import sys
from pathlib import Path

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
