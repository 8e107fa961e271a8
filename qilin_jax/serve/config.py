"""Settings of the server: the `serve:` section of a run config (`python main.py --config
configs/serve.yaml serve.port=8080`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qilin_jax.infer.config import DecodeOptions

# The demo run's final stage-2 checkpoint (configs/demo.yaml: output_dir runs, name demo).
DEMO_CHECKPOINT = "runs/demo/stage2/final"


@dataclass
class ServeConfig(DecodeOptions):
    """An OpenAI-compatible server: model, address, batching and limits.

    The DecodeOptions fields are the server's defaults: `max_new_tokens` when a request gives
    no max_tokens, greedy unless a request sends temperature > 0 (or do_sample with
    `temperature` here), `stop` strings added to a request's own, the template / system
    prompt / image mode the checkpoint was trained with, `tensor_parallel` over the devices.
    """

    checkpoint: str = DEMO_CHECKPOINT  # a trained or converted checkpoint directory
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "qilin-med-vl"  # the `model` id clients send and /v1/models lists
    api_key: str = ""  # non-empty (or env QILIN_API_KEY): requests need "Authorization: Bearer <key>"
    slots: int = 8  # requests decoded together (one KV-cache row each)
    max_context: int = 0  # prompt + answer tokens per request; 0 = max_position_embeddings
    # Prompt lengths prefill is compiled for (a prompt is padded to the next one); [] = the
    # ladder of qilin_jax.infer.generate.prompt_length_bucket up to max_context.
    prompt_buckets: list[int] = field(default_factory=list)
    max_queue: int = 64  # requests waiting for a slot; past it 429 with Retry-After
    # Waiting prompts prefilled together in one program (up to this many; 1 = one at a time).
    prefill_batch: int = 4
    max_images: int = 4  # images per request (composited into one, as in training)
    max_body_mb: float = 20.0  # request body limit (base64 images included)
    max_new_tokens: int = 256

    def validate(self, section: str = "serve") -> None:
        """Raise ValueError naming the `serve.field` that is out of range."""
        super().validate(section)
        if not 0 < self.port < 65536:
            raise ValueError(f"{section}.port must be in 1..65535, got {self.port}")
        if self.slots < 1:
            raise ValueError(f"{section}.slots must be >= 1, got {self.slots}")
        if self.max_context < 0:
            raise ValueError(f"{section}.max_context must be >= 0, got {self.max_context}")
        if self.prefill_batch < 1:
            raise ValueError(f"{section}.prefill_batch must be >= 1, got {self.prefill_batch}")
        if self.max_queue < 0:
            raise ValueError(f"{section}.max_queue must be >= 0, got {self.max_queue}")
        if not 1 <= self.max_images <= 4:
            raise ValueError(f"{section}.max_images must be in 1..4 (images are composited), got {self.max_images}")
        if self.max_body_mb <= 0:
            raise ValueError(f"{section}.max_body_mb must be > 0, got {self.max_body_mb}")
        if not isinstance(self.prompt_buckets, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.prompt_buckets
        ):
            raise ValueError(
                f"{section}.prompt_buckets must be a list of positive integers, got {self.prompt_buckets!r}"
            )
        if not self.model_name:
            raise ValueError(f"{section}.model_name must not be empty")
