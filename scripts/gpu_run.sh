#!/usr/bin/env bash
# Run a workspace command on a GPU machine with torch preinstalled (no uv): wheels from .whl,
# every member's src on PYTHONPATH. Usage: scripts/gpu_run.sh python3 some_script.py ...
set -eo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
PYTHONPATH="$(ls -d "$PWD"/packages/*/src | paste -sd:)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1
exec "$@"
