#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, lint included. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
