"""Settings of chat, batch inference and evaluation: the `chat:`, `batch:` and `eval:` YAML sections.

Plain dataclasses with every field defaulted; `qilin_jax/config.py` embeds them as sections of
the run config, so `python main.py --config X.yaml chat.temperature=0.2` reaches these fields.
The decoding fields are shared (`DecodeOptions`) and mean the same in every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qilin_jax.data.images import IMAGE_MODES

TASKS = ("pmc_vqa", "demo", "open")
LANGUAGES = ("en", "zh")


@dataclass
class DecodeOptions:
    """Decoding: greedy unless do_sample (then temperature / top_k / top_p), seeded, stop strings."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    # The answer is cut before the first stop string ("</s>" is also the eos token, which ends
    # generation by itself; "USER:" catches a model that starts the next turn on its own).
    stop: list[str] = field(default_factory=lambda: ["</s>", "USER:"])
    # Conversation template the checkpoint was trained with (Qilin-Med-VL stage 2: "v1";
    # the release's chat CLI used "llava_v1"). See qilin_jax.data.conversation.TEMPLATES.
    template: str = "v1"
    # Replaces the template's system prompt when non-empty.
    system: str = ""
    # Image preprocessing: "pad" (stage 2, what the release's chat and eval use) or "square".
    image_mode: str = "pad"
    # Tensor-parallel degree over the attention heads / MLP / vocab (1 = one device, -1 = all
    # devices); the other devices split the batch (data parallel).
    tensor_parallel: int = 1

    def validate(self, section: str) -> None:
        """Raise ValueError naming the `section.field` that is out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"{section}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature < 0:
            raise ValueError(f"{section}.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{section}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"{section}.top_k must be >= 0, got {self.top_k}")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"{section}.image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.tensor_parallel == 0 or self.tensor_parallel < -1:
            raise ValueError(f"{section}.tensor_parallel must be -1 or >= 1, got {self.tensor_parallel}")
        from qilin_jax.data.conversation import TEMPLATES

        if self.template not in TEMPLATES:
            raise ValueError(f"{section}.template {self.template!r} is unknown; known: {sorted(TEMPLATES)}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"{section}.stop must be a list of non-empty strings, got {self.stop!r}")


@dataclass
class ChatConfig(DecodeOptions):
    """Interactive chat about one image; one-shot (answer on stdout) when `question` is set."""

    image: str = ""  # JPEG/PNG/DICOM path; "" = text-only until `/image PATH`
    question: str = ""  # non-empty: answer this one question and exit
    # Prompt tokens kept at most (oldest turns dropped first; the image turn stays).
    # 0 = the model's max_position_embeddings minus max_new_tokens.
    max_context: int = 0
    stream: bool = True  # print tokens as they are generated (else the whole answer at once)

    def validate(self, section: str = "chat") -> None:
        """Raise ValueError naming the field that is out of range."""
        super().validate(section)
        if self.max_context < 0:
            raise ValueError(f"{section}.max_context must be >= 0, got {self.max_context}")


@dataclass
class BatchConfig(DecodeOptions):
    """Batch inference: a JSONL/CSV of (id, image, question) in, a JSONL of answers out."""

    input: str = ""  # .jsonl / .json (a list) / .csv
    output: str = ""  # .jsonl; default: <input stem>.answers.jsonl next to the input
    image_folder: str = ""  # relative image names are resolved against it
    batch_size: int = 8
    # Field (column) names; a missing id becomes "row-<n>" (n = 0-based row index).
    id_field: str = "id"
    image_field: str = "image"
    question_field: str = "question"
    max_new_tokens: int = 256
    limit: int = 0  # answer at most this many new rows, then stop (0 = all)
    resume: bool = True  # skip ids already in the output (False: the output must not exist)
    strict: bool = False  # a bad row (missing image, no question) raises instead of being skipped
    progress: bool = True  # tqdm progress bar on stderr

    def validate(self, section: str = "batch") -> None:
        """Raise ValueError naming the field that is out of range."""
        super().validate(section)
        if not self.input:
            raise ValueError(f"{section}.input is empty; set it to a .jsonl/.json/.csv of questions")
        if self.batch_size < 1:
            raise ValueError(f"{section}.batch_size must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ValueError(f"{section}.limit must be >= 0, got {self.limit}")


@dataclass
class EvalConfig(DecodeOptions):
    """Evaluation: PMC-VQA multiple choice, the bundled demo task, or open-ended answers."""

    task: str = "pmc_vqa"  # pmc_vqa | demo | open
    csv: str = ""  # pmc_vqa: the PMC-VQA test CSV (open: a PMC-VQA CSV scored on its Answer column)
    json: str = ""  # demo: heldout.json; open: LLaVA-style JSON/JSONL (first human turn, first gpt turn)
    image_folder: str = ""  # where Figure_path / image names live (demo: <generated>/images)
    output_dir: str = "runs/eval"  # report.json, predictions.jsonl, generations.jsonl
    batch_size: int = 8
    # PMC-VQA prompt language: "en" ends with "Answer with the option's letter from the given
    # choices directly.", "zh" with "请直接回答选项字母。".
    language: str = "en"
    max_new_tokens: int = 64
    limit: int = 0  # evaluate the first N samples only (0 = all)
    resume: bool = True  # reuse generations already in output_dir (keyed by sample id)
    strict: bool = False
    progress: bool = True

    def validate(self, section: str = "eval") -> None:
        """Raise ValueError naming the field that is out of range or missing."""
        super().validate(section)
        if self.task not in TASKS:
            raise ValueError(f"{section}.task must be one of {TASKS}, got {self.task!r}")
        if self.language not in LANGUAGES:
            raise ValueError(f"{section}.language must be one of {LANGUAGES}, got {self.language!r}")
        if self.task == "pmc_vqa" and not self.csv:
            raise ValueError(
                f"{section}.csv is empty; task pmc_vqa needs the PMC-VQA test CSV "
                f"(e.g. {section}.csv=data/pmc_vqa/test.csv)"
            )
        if self.task == "demo" and not self.json:
            raise ValueError(
                f"{section}.json is empty; task demo needs heldout.json "
                f"(e.g. {section}.json=data/demo/generated/heldout.json)"
            )
        if self.task == "open" and not (self.json or self.csv):
            raise ValueError(f"{section}.json (or {section}.csv) is empty; task open needs the questions")
        if self.batch_size < 1:
            raise ValueError(f"{section}.batch_size must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ValueError(f"{section}.limit must be >= 0, got {self.limit}")


def section_from_dict(cls, d: dict[str, Any] | None, section: str):
    """An instance of a config dataclass from a mapping: the run config's parser
    (qilin_jax.config_parse), so unknown keys and wrong types raise ConfigError naming
    `section.key`."""
    from qilin_jax.config_parse import parse_dataclass

    return parse_dataclass(cls, dict(d or {}), section)
