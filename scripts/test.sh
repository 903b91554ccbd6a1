#!/usr/bin/env bash
# The test command: sets up what it needs (idempotent) and runs the whole suite on the CPU.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k conv    # extra args go to pytest (main suite)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import lorafit, peft, pytest" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"   # CPU wheel; a bare torch requirement pulls a CUDA build
  python -m pip install -q -e ".[dev]"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
