"""LoRA stages in the real training loop (8 simulated devices, FSDP): what trains, what stays
frozen, the sharding of the adapters, the saved checkpoint, the config contract."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from qilin_jax.checkpoint import load_pretrained
from qilin_jax.config import ConfigError, load_config
from qilin_jax.models import lora as L
from tests.train_helpers import base_config, make_data, write_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from qilin_jax.train.loop import run_training

    tmp = tmp_path_factory.mktemp("lora_run")
    data = make_data(tmp_path_factory.getbasetemp() / "demo_data")
    raw = base_config(data, tmp / "runs", steps=(2, 3), every_steps=2)
    raw["stages"][1].update(lora=True, trainable=["adapter/.*"])
    raw["stages"].append({"name": "stage3", "trainable": ["adapter/.*"], "learning_rate": 1e-4, "max_steps": 1})
    raw["train"] = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "trainable_learning_rate": 1e-5}}
    cfg = load_config(write_config(tmp / "cfg.yaml", raw))
    results = run_training(cfg)
    return cfg, results


def _params(path):
    return nnx.state(load_pretrained(path), nnx.Param).to_pure_dict()


def test_lora_stage_trains_adapters_only(lora_run):
    _, results = lora_run
    assert [r.name for r in results] == ["stage1", "stage2", "stage3"]
    assert all(np.isfinite(r.losses).all() and r.steps == n for r, n in zip(results, (2, 3, 1)))
    s1, s2, s3 = (_params(r.final_dir) for r in results)
    lay1, lay2 = s1["llm"]["layers"], s2["llm"]["layers"]
    assert L.SCALING not in lay1 and L.SCALING in lay2
    assert {k for k in lay2 if k.endswith("_lora_a")} == {t + "_lora_a" for t in L.TARGETS}
    np.testing.assert_array_equal(lay2[L.SCALING], np.full(lay2[L.SCALING].shape, 2.0, np.float32))
    # The base LLM is bit-identical; B moved off its zero init; the projector trained.
    for k, v in lay1.items():
        np.testing.assert_array_equal(lay2[k], v)
    for k in ("embed_tokens", "norm", "lm_head"):
        np.testing.assert_array_equal(s2["llm"][k], s1["llm"][k])
    jax.tree.map(np.testing.assert_array_equal, s2["vision"], s1["vision"])
    assert all(np.abs(lay2[t + "_lora_b"]).max() > 0 for t in L.TARGETS)
    assert not np.array_equal(s2["adapter"]["linear_1"], s1["adapter"]["linear_1"])
    # The stage after it trains on the merged model: no adapters, the LLM = merge(stage 2).
    assert L.SCALING not in s3["llm"]["layers"]
    merged = L.merge(jax.tree.map(np.asarray, s2))
    for k, v in s3["llm"]["layers"].items():
        np.testing.assert_allclose(v, merged["llm"]["layers"][k], rtol=0, atol=1e-6)


def test_adapter_learning_rate_is_the_trainable_one(lora_run):
    """The projector moves ~lr 1e-5 per step (Adam's step is ~lr), the adapters ~2e-4 (the stage's)."""
    _, results = lora_run
    s1, s2 = (_params(r.final_dir) for r in results[:2])
    d_proj = np.abs(s2["adapter"]["linear_1"] - s1["adapter"]["linear_1"]).max()
    assert 0 < d_proj <= 3 * 1e-5 * 1.01


def test_adapters_shard_like_their_matrix():
    from qilin_jax.config import LoraConfig
    from qilin_jax.models import model_preset
    from qilin_jax.sharding import make_mesh
    from qilin_jax.train.lora import lora_parts
    from qilin_jax.train.state import model_parts

    mesh = make_mesh(1, 4, 2)
    from qilin_jax.sharding import DEFAULT_RULES as rules

    parts = lora_parts(model_parts(model_preset("tiny"), mesh, rules), LoraConfig(rank=4), mesh, rules)
    sh = parts.shardings["llm"]["layers"]
    for t in L.TARGETS:
        base, a, b = sh[t].spec, sh[t + "_lora_a"].spec, sh[t + "_lora_b"].spec
        base = tuple(base) + (None,) * (3 - len(base))
        assert tuple(a)[:2] == base[:2] and (len(tuple(a)) < 3 or tuple(a)[2] is None), (t, a, base)
        assert (tuple(b) + (None,) * 3)[2] == base[2] and (tuple(b) + (None,) * 3)[1] is None, (t, b, base)
    assert any(x is not None for t in L.TARGETS for x in tuple(sh[t + "_lora_a"].spec))


def test_config_contract(tmp_path, tmp_path_factory):
    data = make_data(tmp_path_factory.getbasetemp() / "demo_data")
    raw = base_config(data, tmp_path / "runs", steps=(1, 1))
    raw["stages"][1].update(lora=True, trainable=["adapter/.*"])
    path = write_config(tmp_path / "c.yaml", raw)
    cfg = load_config(path, ["train.lora.rank=16", "train.lora.alpha=32", "train.lora.targets=[q_proj, v_proj]"])
    assert cfg.train.lora.rank == 16 and cfg.train.lora.alpha == 32.0 and cfg.stages[1].lora
    assert L.resolve_targets(cfg.train.lora.targets) == ["q_proj", "v_proj"]
    assert load_config(path, ["stages.1.trainable=[]"]).stages[1].trainable == []  # adapters alone
    assert load_config(path, ["model.quantize=nf4"]).model.quantize == "nf4"  # QLoRA
    for bad, msg in (
        (["train.lora.rank=0"], "rank"),
        (["train.lora.targets=[qproj]"], "qproj"),
        (["stages.1.trainable=[llm/.*]"], "keeps the LLM frozen"),
        (["stages.0.trainable=[]"], "must train something"),
        (["model.quantize=nf4", "stages.0.trainable=[llm/.*]"], "cannot train in full"),
        (["model.quantize=int3"], "model.quantize"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(path, bad)
