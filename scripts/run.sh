#!/usr/bin/env bash
# Set up (if needed) and start the REST service on embedded defaults: data in ./.advplugin/data
# (SQLite gallery, FAISS snapshot, key file created 0600 on first start, API key in
# .advplugin/data/api-key), dlib extractor, best protection scheme available (xnn today).
# Options and ADVPLUGIN_* variables are passed through, e.g. ./scripts/run.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/advplugin serve "$@"
