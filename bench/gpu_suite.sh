#!/usr/bin/env bash
# The GPU suite (parity, train-step MFU, 13B decode, peak memory) in one run, one JSON file.
#   bench/gpu_suite.sh [--out PATH|DIR] [--dry-run] [--parts ...] [--limit PART=SECONDS]
# See bench/gpu_suite.py for what each part measures; --dry-run rehearses it on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" bench/gpu_suite.py "$@"
