"""`python -m qilin_jax --config X.yaml [key.path=value ...]`: see qilin_jax.cli."""

import sys

from qilin_jax.cli import main

sys.exit(main())
