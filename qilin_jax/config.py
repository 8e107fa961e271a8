"""The run configuration: YAML files validated into typed dataclasses.

A config file may name a `base:` file (relative to itself) and restate only what changes;
mappings merge deeply, lists and scalars replace. Command-line overrides are dotted paths:
`train.steps=10`, `stages.1.learning_rate=2e-5`, `model.dtype=bfloat16`. Unknown keys,
wrong types and impossible combinations are errors that name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from qilin_jax.models.configs import PRESETS, QilinConfig, model_preset


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or contradicts another."""


@dataclass
class ModelSection:
    """`model:` what to build and where its weights come from."""

    preset: str = "tiny"  # a key of qilin_jax.models.configs.PRESETS
    # Overrides of QilinConfig fields on top of the preset (vision/text are merged per key).
    overrides: dict = field(default_factory=dict)
    # A checkpoint written by `python -m converters to-jax` or by training; its config wins
    # over preset/overrides for shapes (dtype/attention/remat/loss_chunk/loss_supervised_only may still be set).
    checkpoint: Optional[str] = None
    tokenizer: str = "data/tokenizer"  # a local HF tokenizer directory
    # Weight-only quantization of the LLM's matrices at load time (models/quant.py): int8,
    # int4 or nf4; null = as stored. Chat, batch and eval run on it; training stages with
    # `lora: true` train adapters over it (QLoRA). A checkpoint saved quantized loads as such.
    quantize: Optional[str] = None


@dataclass
class StageConfig:
    """One curriculum stage: what trains, on what data, with which optimizer settings."""

    name: str = "stage1"
    # Parameter-path regexes ("adapter/.*", "llm/.*"): trainable; everything else is frozen
    # (no gradient computation, no optimizer state).
    trainable: list = field(default_factory=lambda: ["adapter/.*"])
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03  # warmup steps = ceil(ratio * total steps) (HF Trainer)
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak (release: 0)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping (HF Trainer default); 0 = off
    grad_accum_steps: int = 1
    num_epochs: float = 1.0  # over this stage's data (steps computed from the data size)
    max_steps: Optional[int] = None  # when set, overrides num_epochs
    data: dict = field(default_factory=dict)  # overrides of the top-level `data:` section
    # Where the weights come from: "previous" (the previous stage's result, or model.* for
    # the first stage) or a checkpoint path whose trainable parts are loaded.
    init_from: str = "previous"
    # Train LoRA adapters (`train.lora`) on the frozen LLM; `trainable` then lists what trains
    # in full beside them (e.g. ["adapter/.*"], or [] for the adapters alone).
    lora: bool = False


@dataclass
class MeshConfig:
    """`mesh:` device mesh sizes (-1 = the rest) and logical-axis rule overrides."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict = field(default_factory=dict)  # logical name -> mesh axis / list / null


@dataclass
class CheckpointConfig:
    """`checkpoint:` Orbax CheckpointManager settings."""

    every_steps: int = 500
    keep: int = 3
    async_save: bool = True
    save_on_signal: bool = True  # SIGTERM/SIGINT: save, then stop (preemption)
    resume: bool = True  # continue from the newest complete checkpoint of this run


@dataclass
class LoggingConfig:
    """`logging:` progress bar, JSONL and TensorBoard metrics."""

    every_steps: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    progress_bar: bool = True


@dataclass
class LoraConfig:
    """`train.lora:` the adapters of stages with `lora: true` (PEFT's LoRA; models/lora.py).
    Defaults: LLaVA-1.5's finetune_lora.sh."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # Decoder matrices that get an adapter (regexes over q_proj k_proj v_proj o_proj gate_proj
    # up_proj down_proj): every linear layer of the LLM; never lm_head, the ViT or the adapter.
    targets: list = field(default_factory=lambda: [".*_proj"])
    # Learning rate of the stage's `trainable` parameters, trained in full beside the adapters
    # (LLaVA: the projector at 2e-5 while the adapters take the stage's 2e-4); null = the
    # stage's learning_rate. Both follow the stage's schedule.
    trainable_learning_rate: Optional[float] = None


@dataclass
class TrainConfig:
    """`train:` run-wide training behaviour."""

    nan_policy: str = "stop"  # stop: error, keep the last good checkpoint | skip: drop the update
    peak_tflops: Optional[float] = None  # per-device peak for MFU (None = by device kind)
    # [first, last]: trace host steps first..last (1-based, inclusive) of every stage with
    # jax.profiler into <run>/<stage>/profile (TensorBoard's profile plugin, Perfetto); [] = off.
    profile_steps: list = field(default_factory=list)
    # Compute the template's preamble (BOS, system prompt, first role tag: 45 tokens of Vicuna
    # v1) once per batch instead of once per row; exact (train.loop.split_shared_prefix).
    # Pays off for short rows on CPU; the rows' attention is then the XLA one, not flash.
    shared_prefix: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DistributedConfig:
    """`distributed:` multi-host set-up through jax.distributed."""

    enabled: str = "auto"  # auto: SLURM/TPU/env detected; "off"; "on" (explicit below)
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list] = None


@dataclass
class RunConfig:
    """The whole run: `python main.py --config X.yaml [key=value ...]`."""

    name: str = "run"
    output_dir: str = "runs"  # the run folder is output_dir/name
    seed: int = 0
    # What main.py does, in order: prepare_demo, train, eval, chat, batch, report.
    tasks: list = field(default_factory=lambda: ["train"])
    model: ModelSection = field(default_factory=ModelSection)
    data: dict = field(default_factory=dict)  # qilin_jax.data.pipeline.DataConfig fields
    stages: list = field(default_factory=list)  # list[StageConfig]
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: dict = field(default_factory=dict)  # qilin_jax.infer.config.EvalConfig fields
    chat: dict = field(default_factory=dict)  # qilin_jax.infer.config.ChatConfig fields
    batch: dict = field(default_factory=dict)  # qilin_jax.infer.config.BatchConfig fields
    demo: dict = field(default_factory=dict)  # options of the bundled demo (configs/demo.yaml)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    def model_config(self) -> QilinConfig:
        """The QilinConfig of `model.preset` with `model.overrides` applied."""
        return build_model_config(self.model.preset, self.model.overrides)

    def stage_data(self, stage: StageConfig):
        """The DataConfig of a stage: top-level `data:` merged with the stage's `data:`."""
        from qilin_jax.data.pipeline import DataConfig

        merged = deep_merge(copy.deepcopy(self.data), stage.data)
        # The model is the one source of truth for image geometry and the image token.
        mc = self.model_config()
        derived = {"image_size": mc.vision.image_size, "patch_size": mc.vision.patch_size,
                   "image_tokens": mc.image_tokens, "image_token_id": mc.image_token_id}
        for k, v in derived.items():
            if merged.get(k) is None:
                merged[k] = v
            elif merged[k] != v:
                raise ConfigError(f"data.{k}={merged[k]} (stage {stage.name!r}) contradicts the model "
                                  f"({v}); remove it from `data:` to take the model's value")
        try:
            return DataConfig.from_dict(merged)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data (stage {stage.name!r}): {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_QILIN_FIELDS = {f.name for f in dataclasses.fields(QilinConfig)}
# TextConfig fields filled from others in __post_init__ when None, and what they derive from.
_TEXT_DERIVED = {"head_dim": ("hidden_size", "num_attention_heads"),
                 "num_key_value_heads": ("num_attention_heads",)}


def build_model_config(preset: str, overrides: dict | None = None) -> QilinConfig:
    """A QilinConfig from a preset name and field overrides (vision/text merged per key)."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    base = model_preset(preset).to_dict()
    overrides = overrides or {}
    unknown = sorted(set(overrides) - _QILIN_FIELDS)
    if unknown:
        raise ConfigError(f"model.overrides: unknown key(s) {unknown}; known: {sorted(_QILIN_FIELDS)}")
    # The preset's derived text fields (head_dim = hidden / heads, kv heads = heads) are
    # recomputed when what they derive from is overridden and they are not.
    text_over = overrides.get("text") or {}
    for derived, inputs in _TEXT_DERIVED.items():
        if derived not in text_over and any(k in text_over for k in inputs):
            base["text"][derived] = None
    merged = deep_merge(base, overrides)
    try:
        return QilinConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from e


def deep_merge(base: dict, update: dict) -> dict:
    """Merge `update` into `base` recursively (dicts merge; anything else replaces)."""
    for k, v in (update or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_yaml(path: str, _seen: tuple = ()) -> dict:
    """Read a YAML config and resolve its `base:` chain into one dict."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: `base:` chain loops: {' -> '.join(_seen + (path,))}")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        return deep_merge(load_yaml(base_path, _seen + (path,)), raw)
    return raw


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (YAML-parsed values; list items by index)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        value = _parse_scalar(text)
        node: Any = raw
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not an index "
                                      f"of a list of {len(node)}") from None
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ConfigError(f"override {key}: {last} is not an index of a list of {len(node)}") from None
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping")
    return raw


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def _accepts_float(tp) -> bool:
    if tp is float:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp)


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a dict, checking keys and types; errors name the key path."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key "
                          f"(known keys of {where or 'the top level'}: {sorted(names)})")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key)
            continue
        if _accepts_float(tp):
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif isinstance(value, str):
                # YAML 1.1 reads 2e-5 (no dot) as a string; take it as the number it means.
                try:
                    value = float(value)
                except ValueError:
                    pass
        if not _type_ok(value, tp):
            raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def validate(cfg: RunConfig) -> RunConfig:
    """Check cross-field rules; convert `stages` entries to StageConfig."""
    stages = []
    for i, s in enumerate(cfg.stages):
        st = s if isinstance(s, StageConfig) else from_dict(StageConfig, s, f"stages.{i}")
        if not st.trainable and not st.lora:
            raise ConfigError(f"stages.{i}.trainable: a stage must train something")
        if st.lora and any(t.startswith("llm") for t in st.trainable):
            raise ConfigError(f"stages.{i}: a LoRA stage keeps the LLM frozen; remove the llm "
                              f"patterns from trainable {st.trainable}")
        if st.learning_rate <= 0:
            raise ConfigError(f"stages.{i}.learning_rate must be > 0")
        if not 0 <= st.warmup_ratio < 1:
            raise ConfigError(f"stages.{i}.warmup_ratio must be in [0, 1)")
        if st.grad_accum_steps < 1:
            raise ConfigError(f"stages.{i}.grad_accum_steps must be >= 1")
        if st.max_steps is not None and st.max_steps < 1:
            raise ConfigError(f"stages.{i}.max_steps must be >= 1")
        if any(t.startswith("vision") for t in st.trainable) and st.name not in ("stage0",):
            pass  # allowed (e.g. a demo-only stage 0), but off the release recipe
        stages.append(st)
    cfg.stages = stages
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: names must be unique, got {names}")
    known_tasks = {"prepare_demo", "train", "eval", "chat", "batch", "report"}
    bad = [t for t in cfg.tasks if t not in known_tasks]
    if bad:
        raise ConfigError(f"tasks: unknown task(s) {bad}; known: {sorted(known_tasks)}")
    if "train" in cfg.tasks and not stages:
        raise ConfigError("tasks has 'train' but `stages:` is empty")
    if cfg.train.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"train.nan_policy must be 'stop' or 'skip', got {cfg.train.nan_policy!r}")
    ps = cfg.train.profile_steps
    if ps and not (isinstance(ps, (list, tuple)) and len(ps) == 2
                   and all(isinstance(x, int) and not isinstance(x, bool) for x in ps) and 1 <= ps[0] <= ps[1]):
        raise ConfigError(f"train.profile_steps must be [] or [first, last] with 1 <= first <= last "
                          f"(steps of each stage, 1-based), got {ps!r}")
    if not isinstance(cfg.train.shared_prefix, bool):
        raise ConfigError(f"train.shared_prefix must be true or false, got {cfg.train.shared_prefix!r}")
    if cfg.model.quantize not in (None, "int8", "int4", "nf4"):
        raise ConfigError(f"model.quantize must be int8, int4, nf4 or null, got {cfg.model.quantize!r}")
    if cfg.model.quantize and "train" in cfg.tasks:
        for i, st in enumerate(stages):
            if any(t.startswith("llm") for t in st.trainable):
                raise ConfigError(f"stages.{i}.trainable {st.trainable}: a quantized LLM "
                                  f"(model.quantize={cfg.model.quantize}) cannot train in full; "
                                  "train LoRA adapters over it (lora: true) or drop model.quantize")
    lc = cfg.train.lora
    if lc.rank < 1 or lc.alpha <= 0 or not 0 <= lc.dropout < 1 or not lc.targets:
        raise ConfigError(f"train.lora: need rank >= 1, alpha > 0, 0 <= dropout < 1 and targets, "
                          f"got rank={lc.rank} alpha={lc.alpha} dropout={lc.dropout} targets={lc.targets}")
    if lc.trainable_learning_rate is not None and lc.trainable_learning_rate <= 0:
        raise ConfigError("train.lora.trainable_learning_rate must be > 0 (or null)")
    if any(st.lora for st in stages):
        from qilin_jax.models.lora import resolve_targets

        try:
            resolve_targets(lc.targets)
        except ValueError as e:
            raise ConfigError(f"train.lora.targets: {e}") from None
    if cfg.distributed.enabled not in ("auto", "on", "off"):
        raise ConfigError("distributed.enabled must be auto, on or off")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    cfg.model_config()  # raises ConfigError on bad model settings
    from qilin_jax.infer.config import BatchConfig, ChatConfig, EvalConfig, section_from_dict

    for name, cls in (("eval", EvalConfig), ("chat", ChatConfig), ("batch", BatchConfig)):
        if name in cfg.tasks or getattr(cfg, name):
            try:
                section = section_from_dict(cls, getattr(cfg, name), name)
                if name in cfg.tasks:
                    section.validate(name)
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from e
    for st in stages:
        cfg.stage_data(st)
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load, merge (`base:`), override and validate a run config."""
    raw = apply_overrides(load_yaml(path), list(overrides or []))
    return validate(from_dict(RunConfig, raw))


def dump_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML (written next to every checkpoint)."""
    d = cfg.to_dict()
    d["stages"] = [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in cfg.stages]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, allow_unicode=True, sort_keys=False)
    os.replace(tmp, path)
