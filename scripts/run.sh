#!/usr/bin/env bash
# Set up (if needed) and start the REST service on embedded defaults: data in ./.advplugin/data
# (SQLite gallery, FAISS snapshot, API key in .advplugin/data/api-key); the keys made 0600 on
# first start (key, master.key, erasure-keys.db) in a key folder of their own, outside that
# tree (~/.config/advplugin/keys/..., ADVPLUGIN_KEY_DIR); dlib extractor, best protection
# scheme available (xnn today).
# Options and ADVPLUGIN_* variables are passed through, e.g. ./scripts/run.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/advplugin serve "$@"
