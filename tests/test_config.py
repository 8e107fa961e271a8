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


@pytest.mark.parametrize(
    "override, fragment",
    [
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
    ],
)
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


SHIPPED = sorted(p for p in glob.glob("configs/**/*.yaml", recursive=True) if "/bench/" not in p)


@pytest.mark.parametrize("path", SHIPPED)
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
    t = build_model_config(
        "qilin_med_vl_13b",
        {"text": {"hidden_size": 256, "num_attention_heads": 4, "head_dim": 32, "num_key_value_heads": 2}},
    ).text
    assert (t.head_dim, t.num_key_value_heads) == (32, 2)  # explicit values win
    t = build_model_config("qilin_med_vl_13b", {"text": {"num_hidden_layers": 2}}).text
    assert (t.head_dim, t.num_key_value_heads) == (128, 40)  # untouched widths keep the preset's


# Every section, every error class: an unknown key, a wrong type and an impossible combination
# each raise a ConfigError whose message names the full dotted key.
SECTION_ERRORS = {
    "top level": [
        (["nmae=x"], "nmae: unknown key (did you mean name?)"),
        (["seed=abc"], "seed: expected int, got 'abc'"),
        (["tasks=[train]", "stages=[]"], "stages: tasks has 'train' but `stages:` is empty"),
    ],
    "model": [
        (["model.tokeniser=x"], "model.tokeniser: unknown key (did you mean model.tokenizer?)"),
        (["model.overrides.text.hidden_sise=8"], "model.overrides.text.hidden_sise: unknown key"),
        (["model.overrides.text.hidden_size=abc"], "model.overrides.text.hidden_size: expected int, got 'abc'"),
        (["model.overrides.dtype=fp8"], "model.overrides.dtype: expected one of 'float32', 'bfloat16', 'float16'"),
        (
            ["model.overrides.text.num_key_value_heads=3"],
            "model.overrides.text.num_attention_heads: 4 is not a multiple of num_key_value_heads (3)",
        ),
        (["model.overrides.vision_feature_layer=9"], "model.overrides.vision_feature_layer: 9 is outside"),
    ],
    "data": [
        (["data.batchsize=3"], "data.batchsize: unknown key (did you mean data.batch_size?)"),
        (["data.batch_size=abc"], "data.batch_size: expected int, got 'abc'"),
        (["data.packing=true", "data.group_by_length=true"], "data.group_by_length: group_by_length applies"),
    ],
    "stages": [
        (["stages.0.learning_rat=1"], "stages.0.learning_rat: unknown key (did you mean stages.0.learning_rate?)"),
        (["stages.0.max_steps=ten"], "stages.0.max_steps: expected int or null, got 'ten'"),
        (["stages.0.warmup_ratio=1.5"], "stages.0.warmup_ratio must be in [0, 1)"),
    ],
    "stage data": [
        (
            ["stages.0.data.bacth_size=2"],
            "stages.0.data.bacth_size: unknown key (did you mean stages.0.data.batch_size?)",
        ),
        (["stages.0.data.seq_buckets=[64,x]"], "stages.0.data.seq_buckets.1: expected int, got 'x'"),
        (["stages.0.data.seq_buckets=[8]"], "stages.0.data.seq_buckets: the longest row (8) cannot hold one image"),
        (["stages.0.data.image_tokens=9"], "stages.0.data.image_tokens=9 (stage 'stage1') contradicts the model"),
    ],
    "mesh": [
        (["mesh.fdsp=2"], "mesh.fdsp: unknown key (did you mean mesh.fsdp?)"),
        (["mesh.tensor=two"], "mesh.tensor: expected int, got 'two'"),
        (["mesh.data=-1"], "mesh: at most one of data/fsdp/tensor may be -1"),
        (["mesh.tensor=0"], "mesh.tensor must be -1 (the rest) or >= 1"),
    ],
    "checkpoint": [
        (["checkpoint.every=5"], "checkpoint.every: unknown key"),
        (["checkpoint.async_save=maybe"], "checkpoint.async_save: expected bool, got 'maybe'"),
        (["checkpoint.keep=0"], "checkpoint.keep must be >= 1"),
    ],
    "logging": [
        (["logging.tensorbord=false"], "logging.tensorbord: unknown key (did you mean logging.tensorboard?)"),
        (["logging.every_steps=1.5"], "logging.every_steps: expected int, got 1.5"),
        (["logging.every_steps=0"], "logging.every_steps must be >= 1"),
    ],
    "train": [
        (["train.nan_polcy=skip"], "train.nan_polcy: unknown key (did you mean train.nan_policy?)"),
        (["train.shared_prefix=yes please"], "train.shared_prefix: expected bool, got 'yes please'"),
        (["train.nan_policy=ignore"], "train.nan_policy: expected one of 'stop', 'skip', got 'ignore'"),
        (["train.profile_steps=[5,2]"], "train.profile_steps must be [] or [first, last]"),
    ],
    "distributed": [
        (
            ["distributed.num_process=2"],
            "distributed.num_process: unknown key (did you mean distributed.num_processes?)",
        ),
        (["distributed.local_device_ids=[0,a]"], "distributed.local_device_ids.1: expected int, got 'a'"),
        (["distributed.enabled=sometimes"], "distributed.enabled: expected one of 'auto', 'on', 'off' or bool"),
        (
            ["distributed.num_processes=2", "distributed.process_id=2"],
            "distributed.process_id must be in [0, num_processes=2)",
        ),
    ],
    "eval": [
        (["eval.tempurature=0.5"], "eval.tempurature: unknown key (did you mean eval.temperature?)"),
        (["eval.batch_size=abc"], "eval.batch_size: expected int, got 'abc'"),
        (["tasks=[train,eval]", "eval.task=pmc_vqa"], "eval.csv is empty"),
    ],
    "chat": [
        (["chat.questoin=hi"], "chat.questoin: unknown key (did you mean chat.question?)"),
        (["chat.stream=loud"], "chat.stream: expected bool, got 'loud'"),
        (["tasks=[chat]", "chat.top_p=0"], "chat.top_p must be in (0, 1]"),
    ],
    "batch": [
        (["batch.inptu=a.jsonl"], "batch.inptu: unknown key (did you mean batch.input?)"),
        (["batch.limit=all"], "batch.limit: expected int, got 'all'"),
        (["tasks=[batch]"], "batch.input is empty"),
    ],
    "serve": [
        (["serve.prot=8080"], "serve.prot: unknown key (did you mean serve.port?)"),
        (["serve.slots=many"], "serve.slots: expected int, got 'many'"),
        (["tasks=[serve]", "serve.port=70000"], "serve.port must be in 1..65535"),
    ],
    "train.lora": [
        (["train.lora.rnak=8"], "train.lora.rnak: unknown key (did you mean train.lora.rank?)"),
        (["train.lora.rank=big"], "train.lora.rank: expected int, got 'big'"),
        (["train.lora.rank=0"], "train.lora: need rank >= 1"),
        (["stages.0.lora=true", "stages.0.trainable=[llm/.*]"], "stages.0: a LoRA stage keeps the LLM frozen"),
        (["model.quantize=int3"], "model.quantize: expected one of"),
    ],
    "demo": [
        (["demo.n_aling=5"], "demo.n_aling: unknown key (did you mean demo.n_align?)"),
        (["demo.n_align=many"], "demo.n_align: expected int or null, got 'many'"),
        (["tasks=[prepare_demo]", "demo.targets.location=90"], "demo.targets.location must be an accuracy in [0, 1]"),
    ],
}


@pytest.mark.parametrize(
    "section, overrides, message",
    [(s, o, m) for s, cases in SECTION_ERRORS.items() for o, m in cases],
    ids=[f"{s}-{o[-1]}" for s, cases in SECTION_ERRORS.items() for o, _ in cases],
)
def test_every_section_names_the_key(tmp_path, section, overrides, message):
    path = _write(tmp_path, "c.yaml", BASE)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert message in str(e.value), str(e.value)


def test_model_configs_are_frozen_and_checked_on_construction():
    import dataclasses

    from qilin_jax.models import QilinConfig, model_preset

    cfg = model_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = "bfloat16"
    assert dataclasses.replace(cfg, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="remat: expected one of 'none', 'full', 'save_dots'"):
        dataclasses.replace(cfg, remat="sometimes")
    assert QilinConfig.from_dict(cfg.to_dict()) == cfg and hash(QilinConfig.from_dict(cfg.to_dict())) == hash(cfg)
    with pytest.raises(ConfigError, match=r"model\.text\.vocab_size: expected int, got '4k'"):
        QilinConfig.from_dict({**cfg.to_dict(), "text": {**cfg.to_dict()["text"], "vocab_size": "4k"}})


def test_one_merge_for_run_configs_checkpoints_and_benches():
    """The preset-plus-overrides rule is the same wherever a model config is built."""
    from qilin_jax.checkpoint import model_config_from_dict
    from qilin_jax.config import build_model_config

    over = {"text": {"hidden_size": 256, "num_attention_heads": 4}, "dtype": "bfloat16"}
    run = build_model_config("qilin_med_vl_13b", over)
    assert model_config_from_dict({"model": {"preset": "qilin_med_vl_13b", "overrides": over}}) == run
    assert (run.text.head_dim, run.text.num_key_value_heads, run.text.num_hidden_layers) == (64, 4, 40)
    with pytest.raises(ConfigError, match="model.overrides.text.rope_theta: expected float, got 'high'"):
        model_config_from_dict({"model": {"preset": "tiny", "overrides": {"text": {"rope_theta": "high"}}}})


def test_bundled_config_by_name_and_pkg_paths():
    import os

    from qilin_jax.config import find_config

    cfg = load_config("demo", ["tasks=[train]"])
    assert cfg.name == "demo" and os.path.isfile(os.path.join(cfg.model.tokenizer, "tokenizer.model"))
    assert find_config("qilin_med_vl_13b/stage2").endswith(os.path.join("qilin_med_vl_13b", "stage2.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no_such_config")


def test_a_new_section_is_parsed_by_declaring_a_field():
    """What a future section (e.g. `serve:` or `train.lora`) gets from its annotations alone."""
    from dataclasses import dataclass, field
    from typing import Literal

    from qilin_jax.config_parse import parse_dataclass

    @dataclass
    class Lora:
        rank: int = 8
        alpha: float = 16.0
        targets: list[str] = field(default_factory=lambda: ["q_proj"])

    @dataclass
    class Serve:
        port: int = 8000
        mode: Literal["chat", "completion"] = "chat"
        lora: Lora | None = None
        limits: dict[str, int] = field(default_factory=dict)

    @dataclass
    class Run:
        serve: Serve = field(default_factory=Serve)

    run = parse_dataclass(Run, {"serve": {"port": 9000, "lora": {"rank": 4, "alpha": "2e1"}, "limits": {"rps": 5}}})
    assert run.serve == Serve(port=9000, lora=Lora(rank=4, alpha=20.0), limits={"rps": 5})
    assert parse_dataclass(Run, {}).serve.lora is None
    for bad, message in [
        ({"serve": {"lora": {"rnak": 4}}}, "serve.lora.rnak: unknown key (did you mean serve.lora.rank?)"),
        ({"serve": {"lora": {"targets": ["q_proj", 3.5]}}}, "serve.lora.targets.1: expected str, got 3.5"),
        ({"serve": {"limits": {"rps": "many"}}}, "serve.limits.rps: expected int, got 'many'"),
        ({"serve": {"mode": "batch"}}, "serve.mode: expected one of 'chat', 'completion', got 'batch'"),
        ({"serve": {"port": True}}, "serve.port: expected int, got True (bool)"),
        ({"serve": {"lora": 4}}, "serve.lora: expected mapping (Lora) or null, got 4"),
        ({"serve": []}, "serve: expected a mapping (Serve), got []"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_dataclass(Run, bad)
        assert message in str(e.value), str(e.value)
