"""Run-config loading: base inheritance, dotted overrides, and errors that name the key."""
import glob

import pytest

from qilin_jax.config import ConfigError, dump_config, load_config


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BASE = """
name: base
tasks: [train]
model: {preset: tiny, overrides: {text: {vocab_size: 4000}, image_token_id: 4000}}
data: {paths: [a.json], batch_size: 4, seq_buckets: [64]}
stages:
  - {name: stage1, trainable: ["adapter/.*"], learning_rate: 1.0e-3, max_steps: 5}
"""


def test_base_and_overrides(tmp_path):
    _write(tmp_path, "base.yaml", BASE)
    child = _write(tmp_path, "child.yaml", "base: base.yaml\nname: child\ndata: {batch_size: 8}\n")
    cfg = load_config(child, ["stages.0.learning_rate=2e-5", "mesh.tensor=2", "model.overrides.dtype=bfloat16"])
    assert cfg.name == "child"
    assert cfg.data["batch_size"] == 8 and cfg.data["paths"] == ["a.json"]  # deep merge
    assert cfg.stages[0].learning_rate == 2e-5 and cfg.mesh.tensor == 2
    assert cfg.model_config().dtype == "bfloat16"
    d = cfg.stage_data(cfg.stages[0])
    assert (d.image_size, d.image_tokens, d.image_token_id) == (32, 16, 4000)  # from the model
    dump_config(cfg, str(tmp_path / "out" / "config.yaml"))
    again = load_config(str(tmp_path / "out" / "config.yaml"))
    assert again.stages[0].learning_rate == 2e-5 and again.data == cfg.data


@pytest.mark.parametrize("override, fragment", [
    ("stages.0.learnin_rate=1", "stages.0.learnin_rate: unknown key"),
    ("mesh.fsdp=two", "mesh.fsdp: expected int"),
    ("stages.0.trainable=[]", "must train something"),
    ("tasks=[train,fly]", "unknown task"),
    ("model.preset=gpt5", "unknown preset"),
    ("model.overrides.adapter=conv", "adapter"),
    ("data.image_size=336", "contradicts the model"),
    ("mesh.data=-1", "at most one of"),
    ("stages.3.learning_rate=1", "not an index"),
    ("train.nan_policy=ignore", "nan_policy"),
    ("train.profile_steps=[5,2]", "train.profile_steps must be"),
    ("train.profile_steps=[0,2]", "train.profile_steps must be"),
    ("train.profile_steps=[3]", "train.profile_steps must be"),
])
def test_errors_name_the_key(tmp_path, override, fragment):
    path = _write(tmp_path, "c.yaml", BASE)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(path, [override])
    assert fragment in str(e.value), str(e.value)


def test_base_loop_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("path", sorted(p for p in glob.glob("configs/**/*.yaml", recursive=True) if "/bench/" not in p))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    cfg.model_config()


def test_task_sections_are_checked(tmp_path):
    path = _write(tmp_path, "c.yaml", BASE)
    with pytest.raises(ConfigError, match="eval: unknown key"):
        load_config(path, ["eval.tempurature=0.5"])
    with pytest.raises(ConfigError, match="eval.json is empty"):
        load_config(path, ["tasks=[train,eval]", "eval.task=demo"])


def test_overridden_widths_rederive_head_dim_and_kv_heads():
    """A preset's derived head_dim / kv heads follow overridden widths unless set explicitly."""
    from qilin_jax.config import build_model_config

    t = build_model_config("tiny", {"text": {"hidden_size": 256, "num_attention_heads": 4}}).text
    assert (t.head_dim, t.num_key_value_heads) == (64, 4)  # tiny's own head_dim is 16
    t = build_model_config("qilin_med_vl_13b", {"text": {"hidden_size": 256, "num_attention_heads": 4}}).text
    assert (t.head_dim, t.num_key_value_heads) == (64, 4)  # not the 13B's 128 / 40
    t = build_model_config("qilin_med_vl_13b", {"text": {"hidden_size": 256, "num_attention_heads": 4,
                                                          "head_dim": 32, "num_key_value_heads": 2}}).text
    assert (t.head_dim, t.num_key_value_heads) == (32, 2)  # explicit values win
    t = build_model_config("qilin_med_vl_13b", {"text": {"num_hidden_layers": 2}}).text
    assert (t.head_dim, t.num_key_value_heads) == (128, 40)  # untouched widths keep the preset's
