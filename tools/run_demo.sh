#!/usr/bin/env bash
# The main job: sets up on a fresh machine, then generates one video with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
exec .venv/bin/python -m sdjax.generate --prompt "${1:-a red circle moves left on a black background}" \
  --out "${2:-outputs/demo.mp4}"
