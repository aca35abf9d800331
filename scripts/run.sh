#!/usr/bin/env bash
# Set up (if needed) and run the main job on embedded defaults (dlib + xnn, local files).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/enroll_identify_lfw.py "$@"
