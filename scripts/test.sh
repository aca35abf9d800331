#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, lint included. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
# Architecture contracts (.importlinter); the wrapper lints the installed layout, adapters/ and
# migrations/ included, which bare `lint-imports` cannot see.
.venv/bin/python scripts/lint_imports.py --no-logo
.venv/bin/python -m pytest "$@"
