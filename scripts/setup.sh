#!/usr/bin/env bash
# Set up fedcl in ./.venv: a virtual environment with fedcl (editable) and its test tools.
# Safe to run again: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# fedcl and its test extras; torch comes from the pins in pyproject.toml (any >= 2.4).
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]'
.venv/bin/fedcl strategies >/dev/null
echo "fedcl is set up in .venv (run: .venv/bin/fedcl simulate --clients 50)"
