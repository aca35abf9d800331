#!/usr/bin/env bash
# One prepared run for a GPU machine (issue 14, Build 5): the GPU tests and benchmarks/gpu.py,
# with output under $OUT (the device tool brings it back).
#
# Two ways in:
# - a machine with a package index: installs the project with its `gpu` and `dev` extras;
# - an offline machine that already holds torch and numpy (this workplace's device machines):
#   the project's other needs travel as wheels in .whl/ (pip download for that machine's Python)
#   and dlib's ResNet weights in .gpudata/ (the file face-recognition-models ships, placed
#   where the adapter looks for it); both are installed under /tmp/site. WHL names another
#   wheel folder: a wheel larger than one call may carry (onnxruntime-gpu, 255 MB) was sent
#   in parts over several calls to the same warm machine and joined into it there.
#   ADVPLUGIN_FACE_DATA=$PWD/.gpudata/data makes the tests find .gpudata/models/*.onnx.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
  WHL=${WHL:-.whl}
  if [ -d "$WHL" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
    # Editable, as on a development machine: setup.cfg maps adapters/ to advplugin.adapters,
    # which only the editable finder resolves when the repository root is on sys.path (pytest).
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
    if [ -d .gpudata ]; then
      mkdir -p /tmp/site/face_recognition_models/models
      touch /tmp/site/face_recognition_models/__init__.py
      cp .gpudata/*.dat /tmp/site/face_recognition_models/models/
    fi
    export PYTHONPATH=/tmp/site
  else
    $PY -m pip install -q -e '.[gpu,dev]' 2>&1 | tail -3 || echo "pip install failed (offline?): using what is installed"
  fi
  $PY - <<'EOF'
import faiss, torch, onnxruntime as ort
print("python", __import__("sys").version.split()[0], "| faiss", faiss.__version__, "GPUs", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, ort.get_available_providers())
EOF
  # -p no:cacheprovider: the working tree may be read-only there; rootdir conftest finds the site.
  $PY -m pytest -q -rs -p no:cacheprovider tests/gpu
  $PY benchmarks/gpu.py && cp benchmarks/results/gpu.json "$OUT/" 2>/dev/null
} 2>&1 | tee "$OUT/device_check.log"
