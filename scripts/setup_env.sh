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
pip_install() {
  # pip's configured-but-absent local indexes print one warning per package: hide only those.
  "$VPY" -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}
echo "stax: setting up .venv (first run takes a few minutes)..."
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  pip_install torch==2.13.0
fi
pip_install -e ".[torch,flax,test,bench]"
# stac-optimizer's wheels declare Python>=3.13 but import on 3.11; it is only a test reference.
pip_install --no-deps --ignore-requires-python stac-optimizer==0.3.0 || \
  echo "note: stac-optimizer could not be installed; its parity tests will be skipped"
echo "$want" > "$stamp"
