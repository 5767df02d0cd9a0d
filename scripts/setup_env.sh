#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with everything the tests and
# benchmarks need. Works on a fresh machine that has only python3. Installs torch==2.13.0
# (the local CPU wheel) when the venv has no torch, so no CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.stax-installed
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[torch,flax,test,bench]"
# stac-optimizer's wheels declare Python>=3.13 but import on 3.11; it is only a test reference.
"$VPY" -m pip install -q --no-deps --ignore-requires-python stac-optimizer==0.3.0 || \
  echo "note: stac-optimizer could not be installed; its parity tests will be skipped"
echo "$want" > "$stamp"
