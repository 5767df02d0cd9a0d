#!/usr/bin/env bash
# The whole test suite: sets up .venv, then runs pytest on 2 workers (tests/ and the docstring
# examples of the stax and torch_bridge packages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -n "${STAX_TEST_WORKERS:-2}" -q tests \
  --doctest-modules stax torch_bridge "$@"
