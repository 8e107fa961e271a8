"""Compile a small config's train steps for a real TPU topology (v5e 2x2) on this CPU machine,
with splash attention: memory_analysis is reported and the compiled FLOPs match step_flops.

Needs libtpu (pip install "qilin-jax[tpu]" / "libtpu==0.0.42.*"; CI installs it); skipped
without it. Each compile takes ~30 s on a small CPU: the two train-step compiles run in the
default suite (the TPU path compiles on every change), the remat comparison is marked slow.
libtpu allows one process at a time (/tmp/libtpu_lockfile); bench/tpu_compile.py sets
ALLOW_MULTIPLE_LIBTPU_LOAD=1 (it compiles, it opens no chip), so another process's lock does
not skip these tests.

FLOP tolerance: the scans are unrolled (XLA's cost analysis counts a loop body once), remat is
off (recompute is not model FLOPs) and the splash kernel is a Mosaic custom call without a
cost estimate, so the formula's attention term is left out of the comparison; what remains
beyond the formula's matmuls is elementwise work (norms, activations, softmax of the
cross-entropy, AdamW), ~2% at this size, so 5% holds.
"""

import dataclasses
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from bench import tpu_compile as T  # noqa: E402
from qilin_jax import sharding as S  # noqa: E402
from qilin_jax.models.common import unrolled_scans  # noqa: E402
from qilin_jax.models.configs import QilinConfig, TextConfig, VisionConfig  # noqa: E402
from qilin_jax.train.flops import step_flops  # noqa: E402

CFG = QilinConfig(
    vision=VisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=112,
        patch_size=14,
    ),
    text=TextConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=1024,
    ),
    image_token_id=1023,
    dtype="bfloat16",
    attention="splash",
    remat="none",
    loss_chunk=0,
)
ROWS, SEQ = 4, 512


@pytest.fixture(scope="module")
def mesh():
    try:
        devices = T.topology_devices("v5e:2x2")
    except Exception as e:  # libtpu present but unusable here
        pytest.skip(f"no TPU topology: {e}")
    return S.make_mesh(1, 4, 1, devices=devices)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_small_train_step_compiles_for_tpu(mesh, stage):
    # conftest sets "highest" matmul precision for exact CPU tests; Mosaic rejects bf16 dots at it.
    with unrolled_scans(), jax.default_matmul_precision("default"):
        compiled = T.lower_train(CFG, mesh, stage, rows=ROWS, accum=1, seq=SEQ).compile()
    mem = compiled.memory_analysis()
    assert mem is not None and mem.argument_size_in_bytes > 0 and mem.generated_code_size_in_bytes > 0
    assert "tpu_custom_call" in compiled.as_text()  # the splash kernel is in the program
    flops = T._flops(compiled) * len(mesh.devices.flat)
    trainable = stage == "stage2"
    formula = step_flops(CFG, ROWS, SEQ, ROWS, llm_trainable=trainable)
    t = CFG.text
    attn = 2 * 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * SEQ * ROWS * SEQ / 2
    attn *= 3 if trainable else 2
    assert abs(flops / (formula - attn) - 1) < 0.05, (flops, formula, attn)


@pytest.mark.slow
def test_remat_does_not_raise_temp_memory_for_tpu(mesh):
    remat = dataclasses.replace(CFG, remat="full")
    with jax.default_matmul_precision("default"):
        a = T.lower_train(CFG, mesh, "stage2", rows=ROWS, accum=2, seq=SEQ).compile().memory_analysis()
        b = T.lower_train(remat, mesh, "stage2", rows=ROWS, accum=2, seq=SEQ).compile().memory_analysis()
    assert b.temp_size_in_bytes <= a.temp_size_in_bytes
