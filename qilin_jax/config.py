"""The run configuration: YAML files parsed into typed dataclasses.

A config file may name a `base:` file (relative to itself) and restate only what changes;
mappings merge deeply, lists and scalars replace. Command-line overrides are dotted paths
whose values are read as YAML: `stages.0.max_steps=10`, `stages.1.learning_rate=2e-5`,
`model.overrides.dtype=bfloat16`, `eval.batch_size=16`, `data.seq_buckets=[64,128]`.
Every section is parsed from its dataclass's annotations by qilin_jax.config_parse.parse
(a new section is a new field); unknown keys, wrong types and impossible combinations are
ConfigErrors that name the full dotted key.

`data`, `eval`, `chat`, `batch` and `demo` stay mappings in RunConfig (each stage merges its
own `data:` over the top-level one and unset data fields are derived from the model; the
tasks fill in defaults such as the run folder), but are parsed against their dataclasses
(DataConfig, EvalConfig, ChatConfig, BatchConfig, DemoSection) when the config is loaded.

Why one file (over 450 lines): every section of the run config and its cross-field rules in
one place, so a key's type, default and checks are read together (the parser itself is
config_parse.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from qilin_jax.config_parse import ConfigError, FieldError, merge, parse_dataclass
from qilin_jax.models.configs import QilinConfig, from_preset

__all__ = [
    "ConfigError",
    "RunConfig",
    "StageConfig",
    "build_model_config",
    "deep_merge",
    "dump_config",
    "load_config",
    "load_yaml",
    "apply_overrides",
    "resolve_path",
    "find_config",
    "validate",
]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Config files shipped inside the package (a wheel has them at qilin_jax/configs); in a checkout
# they are the repository's configs/ folder.
BUNDLED_CONFIG_DIRS = (os.path.join(PACKAGE_DIR, "configs"), os.path.join(os.path.dirname(PACKAGE_DIR), "configs"))
TASKS = ("prepare_demo", "train", "eval", "chat", "batch", "report", "serve")


def resolve_path(path: str) -> str:
    """A path of a config with `pkg:` resolved: `pkg:demo_data/tokenizer` is that folder inside
    the installed qilin_jax package (the demo tokenizer), wherever the run starts from."""
    if isinstance(path, str) and path.startswith("pkg:"):
        return os.path.join(PACKAGE_DIR, path[4:])
    return path


def find_config(name: str) -> str:
    """The file of `--config NAME`: an existing path, else a config bundled with the package
    (`demo`, `demo.yaml`, `qilin_med_vl_13b/stage2`)."""
    if os.path.exists(name):
        return name
    rel = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    rel = rel[len("configs/") :] if rel.startswith("configs/") else rel
    for d in BUNDLED_CONFIG_DIRS:
        if os.path.isfile(os.path.join(d, rel)):
            return os.path.join(d, rel)
    return name  # load_yaml reports the missing file


@dataclass
class ModelSection:
    """`model:` what to build and where its weights come from."""

    preset: str = "tiny"  # a key of qilin_jax.models.configs.PRESETS
    # Overrides of QilinConfig fields on top of the preset (vision/text are merged per key).
    overrides: dict[str, Any] = field(default_factory=dict)
    # A checkpoint written by `python -m converters to-jax` or by training; its config wins
    # over preset/overrides for shapes (dtype/attention/remat/loss_chunk/loss_supervised_only may still be set).
    checkpoint: str | None = None
    # A local HF tokenizer directory; `pkg:demo_data/tokenizer` is the demo's, inside the package.
    tokenizer: str = "pkg:demo_data/tokenizer"
    # Weight-only quantization of the LLM's matrices at load time (models/quant.py): int8,
    # int4 or nf4; null = as stored. Chat, batch, eval and serve run on it; training stages with
    # `lora: true` train adapters over it (QLoRA). A checkpoint saved quantized loads as such.
    quantize: Literal["int8", "int4", "nf4"] | None = None


@dataclass
class StageConfig:
    """One curriculum stage: what trains, on what data, with which optimizer settings."""

    name: str = "stage1"
    # Parameter-path regexes ("adapter/.*", "llm/.*"): trainable; everything else is frozen
    # (no gradient computation, no optimizer state).
    trainable: list[str] = field(default_factory=lambda: ["adapter/.*"])
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
    max_steps: int | None = None  # when set, overrides num_epochs
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the top-level `data:` section
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
    rules: dict[str, Any] = field(default_factory=dict)  # logical name -> mesh axis / list / null


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
    targets: list[str] = field(default_factory=lambda: [".*_proj"])
    # Learning rate of the stage's `trainable` parameters, trained in full beside the adapters
    # (LLaVA: the projector at 2e-5 while the adapters take the stage's 2e-4); null = the
    # stage's learning_rate. Both follow the stage's schedule.
    trainable_learning_rate: float | None = None


@dataclass
class TrainConfig:
    """`train:` run-wide training behaviour."""

    nan_policy: Literal["stop", "skip"] = "stop"  # stop: error, keep the last good checkpoint | skip: drop the update
    peak_tflops: float | None = None  # per-device peak for MFU (None = by device kind)
    # [first, last]: trace host steps first..last (1-based, inclusive) of every stage with
    # jax.profiler into <run>/<stage>/profile (TensorBoard's profile plugin, Perfetto); [] = off.
    profile_steps: list[int] = field(default_factory=list)
    # Compute the template's preamble (BOS, system prompt, first role tag: 45 tokens of Vicuna
    # v1) once per batch instead of once per row; exact (train.shared_prefix.split_shared_prefix).
    # Pays off for short rows on CPU; the rows' attention is then the XLA one, not flash.
    shared_prefix: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DistributedConfig:
    """`distributed:` multi-host set-up through jax.distributed."""

    # auto: SLURM/TPU/env detected; "off"; "on" (explicit below). YAML's bare on/off (booleans)
    # mean "on"/"off".
    enabled: Literal["auto", "on", "off"] | bool = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None


@dataclass
class DemoSection:
    """`demo:` the bundled demo's data generator (qilin_jax.demo_data.make_demo) and targets."""

    data_dir: str = "data/demo/generated"  # relative to the working directory
    seed: int | None = None
    image_size: int | None = None
    n_align: int | None = None
    n_instruct: int | None = None
    n_heldout: int | None = None
    n_csv: int | None = None
    targets: dict[str, float] = field(default_factory=lambda: {"location": 0.9, "modality": 0.9})
    # Pretrained backbones (HF CLIP + LLaMA dirs and a sha256 manifest,
    # qilin_jax.demo_data.pretrain_backbones): prepare_demo checks and converts them into the
    # run folder and sets model.checkpoint to the result; null = train from model.checkpoint.
    backbones: str | None = None

    def validate(self, where: str = "demo") -> None:
        """Raise ConfigError naming the option that is out of range."""
        for name in ("n_align", "n_instruct", "n_heldout", "n_csv"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {n}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"{where}.image_size must be >= 16, got {self.image_size}")
        for q, t in self.targets.items():
            if not 0 <= t <= 1:
                raise ConfigError(f"{where}.targets.{q} must be an accuracy in [0, 1], got {t}")


@dataclass
class RunConfig:
    """The whole run: `python main.py --config X.yaml [key=value ...]`."""

    name: str = "run"
    output_dir: str = "runs"  # the run folder is output_dir/name
    seed: int = 0
    # What main.py does, in order: prepare_demo, train, eval, chat, batch, report, serve.
    tasks: list[str] = field(default_factory=lambda: ["train"])
    model: ModelSection = field(default_factory=ModelSection)
    data: dict[str, Any] = field(default_factory=dict)  # qilin_jax.data.config.DataConfig fields
    stages: list[StageConfig] = field(default_factory=list)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: dict[str, Any] = field(default_factory=dict)  # qilin_jax.infer.config.EvalConfig fields
    chat: dict[str, Any] = field(default_factory=dict)  # qilin_jax.infer.config.ChatConfig fields
    batch: dict[str, Any] = field(default_factory=dict)  # qilin_jax.infer.config.BatchConfig fields
    serve: dict[str, Any] = field(default_factory=dict)  # qilin_jax.serve.config.ServeConfig fields
    demo: dict[str, Any] = field(default_factory=dict)  # DemoSection fields (configs/demo.yaml)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    def model_config(self) -> QilinConfig:
        """The QilinConfig of `model.preset` with `model.overrides` applied."""
        return build_model_config(self.model.preset, self.model.overrides)

    def stage_data(self, stage: StageConfig):
        """The DataConfig of a stage: top-level `data:` merged with the stage's `data:`; an error
        names the key where it is set (`stages.<i>.data.<key>` or `data.<key>`)."""
        from qilin_jax.data.config import DataConfig

        i = next((n for n, s in enumerate(self.stages) if s is stage), None)

        def key(name: str) -> str:
            return f"stages.{i}.data.{name}" if i is not None and name in stage.data else f"data.{name}"

        merged = merge(copy.deepcopy(self.data), stage.data)
        # The model is the one source of truth for image geometry and the image token.
        mc = self.model_config()
        derived = {
            "image_size": mc.vision.image_size,
            "patch_size": mc.vision.patch_size,
            "image_tokens": mc.image_tokens,
            "image_token_id": mc.image_token_id,
        }
        for k, v in derived.items():
            if merged.get(k) is None:
                merged[k] = v
            elif merged[k] != v:
                raise ConfigError(
                    f"{key(k)}={merged[k]} (stage {stage.name!r}) contradicts the model "
                    f"({v}); remove it from `data:` to take the model's value"
                )
        try:
            return DataConfig.from_dict(merged, where="data")
        except FieldError as e:
            name = e.field.split(".", 1)[-1]
            raise ConfigError(
                f"{key(name)}: {e.message} (stage {stage.name!r}: `data:` merged with the stage's `data:`)"
            ) from None

    def to_dict(self) -> dict:
        """The config as plain dicts and lists (YAML)."""
        return dataclasses.asdict(self)


def build_model_config(preset: str, overrides: dict | None = None) -> QilinConfig:
    """A QilinConfig from a preset name and field overrides (vision/text merged per key)."""
    return from_preset(preset, overrides, where="model.overrides")


deep_merge = merge  # the one merge rule (qilin_jax.config_parse.merge), under its older name


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
        return merge(load_yaml(base_path, _seen + (path,)), raw)
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (YAML-parsed values; list items by index)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else ""
        node: Any = raw
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise ConfigError(
                        f"override {key}: {'.'.join(parts[: i + 1])} is not an index of a list of {len(node)}"
                    ) from None
            elif isinstance(node, dict):
                node = node.setdefault(p, {})
            else:
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a mapping")
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


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a dict, checking keys and types; errors name the key path."""
    return parse_dataclass(cls, d, where)


def _section_schemas() -> dict:
    from qilin_jax.data.config import DataConfig
    from qilin_jax.infer.config import BatchConfig, ChatConfig, EvalConfig
    from qilin_jax.serve.config import ServeConfig

    return {
        "eval": EvalConfig,
        "chat": ChatConfig,
        "batch": BatchConfig,
        "serve": ServeConfig,
        "demo": DemoSection,
        "data": DataConfig,
    }


def validate(cfg: RunConfig) -> RunConfig:
    """Check every section's keys and types and the cross-field rules; returns `cfg` with
    `stages` entries as StageConfig and `distributed.enabled` as a string."""
    stages = [
        parse_dataclass(StageConfig, s, f"stages.{i}") if isinstance(s, dict) else s for i, s in enumerate(cfg.stages)
    ]
    for i, st in enumerate(stages):
        if not st.trainable and not st.lora:
            raise ConfigError(f"stages.{i}.trainable: a stage must train something")
        if st.lora and any(t.startswith("llm") for t in st.trainable):
            raise ConfigError(
                f"stages.{i}: a LoRA stage keeps the LLM frozen; remove the llm patterns from trainable {st.trainable}"
            )
        if st.learning_rate <= 0:
            raise ConfigError(f"stages.{i}.learning_rate must be > 0")
        if not 0 <= st.warmup_ratio < 1:
            raise ConfigError(f"stages.{i}.warmup_ratio must be in [0, 1)")
        if st.grad_accum_steps < 1:
            raise ConfigError(f"stages.{i}.grad_accum_steps must be >= 1")
        if st.max_steps is not None and st.max_steps < 1:
            raise ConfigError(f"stages.{i}.max_steps must be >= 1")
        if st.num_epochs <= 0:
            raise ConfigError(f"stages.{i}.num_epochs must be > 0")
    cfg.stages = stages
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: names must be unique, got {names}")
    for i, t in enumerate(cfg.tasks):
        if t not in TASKS:
            raise ConfigError(f"tasks.{i}: unknown task {t!r}; known: {list(TASKS)}")
    if "train" in cfg.tasks and not stages:
        raise ConfigError("stages: tasks has 'train' but `stages:` is empty")
    ps = cfg.train.profile_steps
    if ps and not (len(ps) == 2 and 1 <= ps[0] <= ps[1]):
        raise ConfigError(
            f"train.profile_steps must be [] or [first, last] with 1 <= first <= last "
            f"(steps of each stage, 1-based), got {ps!r}"
        )
    if isinstance(cfg.distributed.enabled, bool):  # YAML reads a bare on/off as a boolean
        cfg.distributed.enabled = "on" if cfg.distributed.enabled else "off"
    if cfg.model.quantize and "train" in cfg.tasks:
        for i, st in enumerate(stages):
            if any(t.startswith("llm") for t in st.trainable):
                raise ConfigError(
                    f"stages.{i}.trainable {st.trainable}: a quantized LLM "
                    f"(model.quantize={cfg.model.quantize}) cannot train in full; "
                    "train LoRA adapters over it (lora: true) or drop model.quantize"
                )
    lc = cfg.train.lora
    if lc.rank < 1 or lc.alpha <= 0 or not 0 <= lc.dropout < 1 or not lc.targets:
        raise ConfigError(
            f"train.lora: need rank >= 1, alpha > 0, 0 <= dropout < 1 and targets, "
            f"got rank={lc.rank} alpha={lc.alpha} dropout={lc.dropout} targets={lc.targets}"
        )
    if lc.trainable_learning_rate is not None and lc.trainable_learning_rate <= 0:
        raise ConfigError("train.lora.trainable_learning_rate must be > 0 (or null)")
    if any(st.lora for st in stages):
        from qilin_jax.models.lora import resolve_targets

        try:
            resolve_targets(lc.targets)
        except ValueError as e:
            raise ConfigError(f"train.lora.targets: {e}") from None
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1 (the rest of the devices)")
    for axis in ("data", "fsdp", "tensor"):
        n = getattr(cfg.mesh, axis)
        if n == 0 or n < -1:
            raise ConfigError(f"mesh.{axis} must be -1 (the rest) or >= 1, got {n}")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(
            f"checkpoint.every_steps must be >= 0 (0: only the final checkpoint), got {cfg.checkpoint.every_steps}"
        )
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    d = cfg.distributed
    if d.num_processes is not None and d.process_id is not None and not 0 <= d.process_id < d.num_processes:
        raise ConfigError(f"distributed.process_id must be in [0, num_processes={d.num_processes}), got {d.process_id}")
    if cfg.logging.every_steps < 1:
        raise ConfigError(f"logging.every_steps must be >= 1, got {cfg.logging.every_steps}")
    cfg.model.tokenizer = resolve_path(cfg.model.tokenizer)
    if cfg.model.checkpoint:
        cfg.model.checkpoint = resolve_path(cfg.model.checkpoint)
    cfg.model_config()  # raises ConfigError on bad model settings
    schemas = _section_schemas()
    for name, cls in schemas.items():
        section = parse_dataclass(cls, getattr(cfg, name), name)  # keys and types
        used = name in cfg.tasks or (name == "demo" and {"prepare_demo", "report"} & set(cfg.tasks))
        if used:
            try:
                section.validate(name)
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e)) from None
    for i, st in enumerate(stages):
        parse_dataclass(schemas["data"], st.data, f"stages.{i}.data")  # keys and types
    for st in stages:
        cfg.stage_data(st)
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load (a path, or the name of a bundled config such as `demo`), merge (`base:`), override
    and validate a run config."""
    raw = apply_overrides(load_yaml(find_config(path)), list(overrides or []))
    return validate(parse_dataclass(RunConfig, raw))


def dump_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML (written next to every checkpoint)."""
    d = cfg.to_dict()
    d["stages"] = [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in cfg.stages]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, allow_unicode=True, sort_keys=False)
    os.replace(tmp, path)
