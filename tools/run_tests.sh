#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, starts the services the tests need, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh "dev,serve"
if [ -f tools/ci_services.sh ]; then
  source tools/ci_services.sh
fi
exec .venv/bin/python -m pytest "$@"
