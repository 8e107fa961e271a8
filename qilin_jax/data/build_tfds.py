"""Build the chimed_vl / pmc_vqa TFDS datasets (array_record) without TensorFlow.

    python -m qilin_jax.data.build_tfds chimed_vl --config alignment \
        --manual_dir /data/chimed_vl_manual --data_dir /data/tfds [--strict]
    python -m qilin_jax.data.build_tfds pmc_vqa --manual_dir /data/PMC-VQA --data_dir /data/tfds

Prints the dataset directory to put in data.paths (data.format=tfds).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILDERS = ("chimed_vl", "pmc_vqa")


def builder_class(name: str):
    """Returns the Builder class of data/<name>/<name>_dataset_builder.py."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {BUILDERS}")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"data.{name}.{name}_dataset_builder").Builder


def build(
    name: str,
    manual_dir: str,
    data_dir: str,
    config: str | None = None,
    strict: bool = False,
) -> str:
    """Builds the dataset as array_record and returns its directory (for data.paths)."""
    import tensorflow_datasets as tfds

    cls = builder_class(name)
    kwargs = {"config": config} if config else {}
    builder = cls(data_dir=data_dir, file_format="array_record", **kwargs)
    builder.strict = strict
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_path)


def main(argv=None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=BUILDERS)
    p.add_argument("--config", default=None, help="chimed_vl: alignment | instruction | chat")
    p.add_argument("--manual_dir", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    a = p.parse_args(argv)
    print(build(a.name, a.manual_dir, a.data_dir, a.config, a.strict))


if __name__ == "__main__":
    main()
