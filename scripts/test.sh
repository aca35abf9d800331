#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, lint included. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${PYTHON:-python3}"
# The official CompreFace SDK for the interop tests (tests/compreface, docs/compreface.md): its
# own venv, because compreface-sdk 0.6.0 imports only with urllib3<2, which the main venv
# cannot hold. The tests run it in a subprocess against a live service.
if [ ! -f .venv-compreface/.installed ]; then
    "$PY" -m venv .venv-compreface
    .venv-compreface/bin/python -m pip install -q "compreface-sdk==0.6.0" "urllib3<2" \
        > .venv-compreface/install.log 2>&1 || { tail -20 .venv-compreface/install.log; exit 1; }
    touch .venv-compreface/.installed
fi
.venv/bin/ruff check .
# Architecture contracts (.importlinter); the wrapper lints the installed layout, adapters/ and
# migrations/ included, which bare `lint-imports` cannot see.
.venv/bin/python scripts/lint_imports.py --no-logo
.venv/bin/python -m pytest "$@"
