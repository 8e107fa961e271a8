"""bench/quant_quality.py on a tiny random checkpoint and the generated demo questions."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_quant_quality_bench_tiny(tiny_model, demo_dir, tmp_path, capsys):
    import quant_quality

    from qilin_jax.checkpoint import save_pretrained

    ckpt = save_pretrained(tiny_model, tiny_model.config, tmp_path / "ckpt")
    res = quant_quality.main(
        ["--checkpoint", str(ckpt), "--heldout", str(demo_dir / "heldout.json"), "--n", "3", "--kinds", "int8,nf4"]
    )
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line == json.loads(json.dumps(res)) and line["prompts"] == 3
    for kind in ("int8", "nf4"):
        r = line["kinds"][kind]
        assert 0.0 <= r["mean_kl"] <= r["max_kl"] and 0.0 <= r["argmax_equal"] <= 1.0
    # int8 moves the distribution less than 4-bit NF4 on the same weights
    assert line["kinds"]["int8"]["mean_kl"] < line["kinds"]["nf4"]["mean_kl"]
