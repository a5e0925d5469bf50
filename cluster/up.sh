#!/usr/bin/env bash
# Bring the local cluster up on 127.0.0.1: Ray head (token auth), S3 (moto) with the bucket,
# MLflow server. Options: --state-dir DIR --bucket NAME --num-cpus N (see cluster/local.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" "$ROOT/cluster/local.py" up "$@"
