#!/usr/bin/env bash
# Set up .venv from nothing (idempotent): the CPU build of torch first, pinned, then the project.
# An unpinned torch would pull a multi-GB CUDA build; see docs/development.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ama_ray_setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e '.[test,gguf]'
  echo "$want" > "$stamp"
fi
