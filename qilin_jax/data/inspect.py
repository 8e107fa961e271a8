"""Check a dataset before training: skipped rows by reason, token lengths, padding estimate.

    python -m qilin_jax.data.inspect --tokenizer qilin_jax/demo_data/tokenizer \
        --paths ChiMed-VL-Instruction.json --image_folder pmc_oa/images [--template v1] \
        [--format llava_json|pmc_vqa_csv|tfds] [--limit 2000] [--no-images]

Runs every row (or the first --limit) through the same per-sample code as the loader and
prints one JSON object: rows read, kept, skipped by reason with examples (file:line, id, what
is wrong), and percentiles of the sequence length with images expanded.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from qilin_jax.data.config import DataConfig
from qilin_jax.data.errors import DataError
from qilin_jax.data.processor import SampleProcessor
from qilin_jax.data.sources import open_source


def inspect_dataset(cfg: DataConfig, tokenizer, limit: int | None = None, images: bool = True) -> dict:
    """Returns {"rows", "kept", "skipped", "examples", "length_percentiles"} for cfg's source."""
    source = open_source(cfg.format, cfg.paths, cfg.image_folder, cfg.split)
    proc = SampleProcessor(cfg, tokenizer, source, len(source), decode_images=images)
    n = len(source) if limit is None else min(limit, len(source))
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    lengths = []
    for i in range(n):
        try:
            out = proc.process(i)
        except DataError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            ex = examples.setdefault(e.reason, [])
            if len(ex) < 5:
                ex.append(f"{proc.describe(i)}: {e}")
            continue
        lengths.append(len(out["input_ids"]))
    pct = {} if not lengths else {str(p): int(np.percentile(lengths, p)) for p in (1, 25, 50, 75, 95, 99, 100)}
    return {"rows": n, "kept": len(lengths), "skipped": skipped, "examples": examples, "length_percentiles": pct}


def main(argv=None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--paths", nargs="+", required=True)
    p.add_argument("--format", default="llava_json")
    p.add_argument("--image_folder", default="")
    p.add_argument("--split", default="train")
    p.add_argument("--template", default="v1")
    p.add_argument("--image_mode", default="pad")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--no-images", action="store_true", help="only check image files exist (fast)")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    cfg = DataConfig(
        format=a.format,
        paths=a.paths,
        image_folder=a.image_folder,
        split=a.split,
        template=a.template,
        image_mode=a.image_mode,
    )
    cfg.validate()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    print(json.dumps(inspect_dataset(cfg, tok, a.limit, not a.no_images), ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
