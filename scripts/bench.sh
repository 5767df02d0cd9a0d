#!/usr/bin/env bash
# The main job: sets up .venv, then runs the benchmark comparison on its embedded data.
# Writes into a new untracked runs/<UTC time>/ (tracked results only with --update-results);
# options: bash scripts/bench.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.main "$@"
