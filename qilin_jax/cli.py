"""The run entry point: `qilin-jax --config X.yaml [key.path=value ...]`, also reached as
`python -m qilin_jax` and, in a checkout, `python main.py`.

`--config` takes a YAML path or the name of a config bundled with the package (`demo`,
`qilin_med_vl_13b/stage2`). The config's `tasks:` list says what runs, in order: prepare_demo
(make the bundled demo data), train (every stage of `stages:`), eval, chat, batch, report (the
demo's report and loss plot). The last line printed is `run folder: <path>`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    """The parsed command line (config, overrides, log level)."""
    p = argparse.ArgumentParser(
        prog="qilin-jax", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default="demo", help="YAML run config, or a bundled config's name (default: demo, the bundled demo)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.max_steps=10")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None, *, train_hooks=None) -> int:
    """Run the config's tasks; returns the process exit status. `train_hooks`: a
    `qilin_jax.train.loop.TrainHooks` for the training loop (tests inject faults with it)."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from qilin_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from qilin_jax import tasks

    out = tasks.run(cfg, train_hooks=train_hooks)
    print(f"run folder: {os.path.abspath(cfg.run_dir)}")
    # Interrupted training (SIGTERM/SIGINT, checkpoint saved): 128 + signal, not 0.
    return tasks.interrupted_exit_code(out)


if __name__ == "__main__":
    sys.exit(main())
