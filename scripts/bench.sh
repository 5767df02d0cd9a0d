#!/usr/bin/env bash
# The main job: sets up .venv, then runs the benchmark comparison on its embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.main "$@"
