#!/usr/bin/env bash
# Run every test: unit tests, property tests and interop tests against the
# real peers (iscsi-test-cu, qemu-io, tgt). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${PYTHON:-python3}
$PY -m ruff check src tests benchmarks
exec $PY -m pytest -p no:cacheprovider -q -ra "$@"
