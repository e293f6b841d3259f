#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs sdjax with the given extras (idempotent).
# Usage: bash tools/setup_venv.sh [extras, e.g. "dev,serve"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py=""
for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12" /usr/bin/python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py="$cand"; break
  fi
done
[ -n "$py" ] || { echo "error: Python 3.12 not found (jax >= 0.11 needs it)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import sdjax" || { echo "error: sdjax failed to install" >&2; exit 1; }
