#!/usr/bin/env bash
# Create or refresh the vision virtual environment (.venv-vision) used by tests/vision and
# `lorafit train --task detect|image-classification` / `lorafit export`. Idempotent: a second run
# only checks versions and re-links the editable install.
#
# Why a second venv: PyPI's torchvision does not import beside the main venv's torch 2.13.0 CPU
# wheel; the vision extras need torch==2.14.1 + torchvision==0.29.1 (a CUDA build; runs on CPU).
#
# Usage: bash scripts/setup_vision_env.sh            (env: VISION_VENV, PYTHON override defaults)
#        . .venv-vision/bin/activate && python -m pytest tests/vision
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VISION_VENV:-$ROOT/.venv-vision}"
PY="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/scripts/vision-constraints.txt"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.split('+')[0] == '2.14.1' \
        and torchvision.__version__.split('+')[0] == '0.29.1'))" 2>/dev/null; then
    pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
pip install -q -c "$CONSTRAINTS" -e "$ROOT[dev,yolo,vision,export]"

python - <<'PY'
import importlib
mods = ["torch", "torchvision", "ultralytics", "timm", "onnx", "onnxruntime", "lorafit"]
vers = {m: getattr(importlib.import_module(m), "__version__", "?") for m in mods}
print("vision env ok:", ", ".join(f"{k} {v}" for k, v in vers.items()))
PY
