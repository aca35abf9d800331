#!/usr/bin/env bash
# Create .venv (if missing) and install advplugin with its extras ($ADVPLUGIN_EXTRAS, default dev). Idempotent: re-installs
# only when setup.cfg changed since the last install. The same commands run in CI and Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.advplugin-installed
extras="${ADVPLUGIN_EXTRAS:-dev}"
want="$(cat setup.cfg pyproject.toml <(echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log=.venv/install.log
    echo "installing advplugin[$extras] into .venv (log: $log) ..."
    .venv/bin/python -m pip install --upgrade pip wheel setuptools > "$log" 2>&1 || { tail -40 "$log"; exit 1; }
    # torch is pinned to the CPU build in setup.cfg (torch==2.13.0); a looser pin would pull
    # gigabytes of CUDA wheels.
    .venv/bin/python -m pip install -e ".[$extras]" >> "$log" 2>&1 || { tail -40 "$log"; exit 1; }
    echo "$want" > "$stamp"
fi
