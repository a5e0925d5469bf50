#!/usr/bin/env bash
# Build the compresszoo wheel with its compiled rANS codec, check it, and unpack the package
# for Ray's py_modules.
#
#   cluster/build_wheel.sh [OUT_DIR]      (default OUT_DIR: dist/)
#
# Leaves OUT_DIR/compresszoo-<version>-<python>-<platform>.whl   for images and `pip install`
#   and OUT_DIR/py_modules/compresszoo/                           for a dev cluster:
#   ray job submit --working-dir . \
#     --runtime-env-json '{"py_modules": ["dist/py_modules/compresszoo"]}' -- python pipelines/...
#
# Why not '{"py_modules": ["dist/compresszoo-...whl"]}'? Ray installs a py_modules wheel with
# `pip install --target`, which resolves and installs every dependency again (torch, ray,
# mlflow) into the job's folder, ahead of the node's own ray on sys.path. The unpacked folder
# is uploaded as-is: no pip, no download, the cluster's torch and ray stay in charge.
# The wheel is built for THIS machine's Python and glibc: build it where the cluster's Python
# matches (python 3.11 for rayproject/ray:*-py311-*), or use the image from cluster/Dockerfile.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$ROOT"

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)"
rm -f "$OUT"/compresszoo-"$version"-*.whl
# --no-build-isolation: build with this environment's Cython and numpy (the ones that compiled
# and tested the codec); --no-deps: the cluster brings torch/ray/mlflow itself.
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$OUT" .
wheel="$(ls -t "$OUT"/compresszoo-"$version"-*.whl | head -n 1)"

"$PY" - "$wheel" "$OUT/py_modules" <<'PYCHECK'
"""Check the wheel: compiled codec inside, nothing that shadows the standard library."""
import os, shutil, subprocess, sys, tempfile, zipfile

wheel, py_modules = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
tops = {n.split("/", 1)[0] for n in names}
bad = sorted(t for t in tops if t != "compresszoo" and not t.endswith(".dist-info"))
if bad:
    sys.exit(f"build_wheel: {wheel} has top-level entries {bad}; only compresszoo belongs there "
             "(a top-level 'platform' would shadow the standard library)")
if not any(n.startswith("compresszoo/ans/_rans") and n.endswith((".so", ".pyd")) for n in names):
    sys.exit(f"build_wheel: {wheel} lacks the compiled compresszoo/ans/_rans extension; "
             "is Cython installed? (pip install 'cython>=3.0' numpy)")
with tempfile.TemporaryDirectory() as tmp:
    zipfile.ZipFile(wheel).extractall(tmp)
    code = ("import platform, compresszoo, compresszoo.ans._rans as r; "
            "assert compresszoo.__file__.startswith(sys.argv[1]), compresszoo.__file__; "
            "assert not platform.__file__.startswith(sys.argv[1]); platform.system(); print(r.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = tmp
    r = subprocess.run([sys.executable, "-c", "import sys; " + code, tmp], env=env, cwd=tmp,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"build_wheel: the unpacked wheel does not import:\n{r.stderr}")
    shutil.rmtree(py_modules, ignore_errors=True)
    os.makedirs(py_modules)
    shutil.copytree(os.path.join(tmp, "compresszoo"), os.path.join(py_modules, "compresszoo"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
PYCHECK
echo "built $wheel"
echo "py_modules folder $OUT/py_modules/compresszoo"
