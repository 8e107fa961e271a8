"""qilin-jax entry point: `python main.py --config configs/X.yaml [key.path=value ...]`.

The config's `tasks:` list says what runs, in order: prepare_demo (make the bundled demo
data), train (every stage of `stages:`), eval, chat, batch, report (the demo's report and
loss plot). The last line printed is `run folder: <path>`. The same entry point is installed
as the `qilin-jax` command and `python -m qilin_jax` (qilin_jax/cli.py).
"""

from __future__ import annotations

import sys

from qilin_jax.cli import main, parse_args  # noqa: F401  (parse_args: the CLI's parser, for callers)

if __name__ == "__main__":
    sys.exit(main())
