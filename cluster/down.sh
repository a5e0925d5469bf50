#!/usr/bin/env bash
# Bring the local cluster down, leaving no process behind. Options: --state-dir DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" "$ROOT/cluster/local.py" down "$@"
