#!/usr/bin/env bash
# Set up a development environment in .venv: pinned torch first (it is large), then the rest, then an editable
# build of tsc_fast with its native solver. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import tsc_fast, tsc_fast._jv; print('tsc_fast ready:', tsc_fast.__file__)"
