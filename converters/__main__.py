"""`python -m converters ...`: see converters/cli.py."""

import sys

from converters.cli import main

sys.exit(main())
