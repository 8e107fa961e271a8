"""The one exception type of the data pipeline: a bad sample with a machine-readable reason."""

from __future__ import annotations

# Reasons a sample is skipped (non-strict) or rejected (strict). Stable strings: they are
# the keys of the skip summary that the loader logs at the end of every epoch.
REASONS = {
    "bad_record": "the record does not have the expected fields or types",
    "bad_json": "a JSONL line is not valid JSON",
    "not_utf8": "the text is not valid UTF-8",
    "empty_conversation": "the conversation has no turns or an empty first question",
    "bad_roles": "turns do not alternate human/gpt",
    "no_assistant_turn": "the conversation has no assistant (gpt) answer",
    "image_in_answer": "an <image> tag appears in an assistant answer",
    "image_count_mismatch": "the number of <image> tags does not match the number of images",
    "too_many_images": "more images than composite_max",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image cannot be decoded (corrupt, truncated or unsupported)",
    "image_cut": "truncation to max_length would cut an image placeholder",
    "no_supervised_tokens": "no supervised token is left (after truncation)",
    "all_skipped": "every sample of a whole data epoch was skipped (a setup error, not a sample)",
}


class DataError(ValueError):
    """A sample that cannot be used; `reason` is one of REASONS, the message says where and why."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise KeyError(f"unknown data error reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(message)
        self.reason = reason
