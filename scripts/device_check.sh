#!/usr/bin/env bash
# One prepared run for a GPU machine (issue 14, Build 5): the GPU tests and benchmarks/gpu.py,
# with output under $OUT (the device tool brings it back). Uses .venv when carried or present,
# else the machine's python3; installs the `gpu` extra only where a package index is reachable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
{
  nvidia-smi || echo "no nvidia-smi"
  $PY -m pip install -q -e '.[gpu,dev]' 2>&1 | tail -3 || echo "pip install failed (offline?): using what is installed"
  $PY -c "import faiss, torch; print('faiss GPUs', faiss.get_num_gpus() if hasattr(faiss,'get_num_gpus') else 0, 'torch cuda', torch.cuda.is_available())"
  $PY -m pytest -q -rs tests/gpu tests/gallery/test_backends.py tests/adapters/test_dlib_torch.py
  $PY benchmarks/gpu.py && cp benchmarks/results/gpu.json "$OUT/" 2>/dev/null
} 2>&1 | tee "$OUT/device_check.log"
