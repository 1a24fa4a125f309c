#!/usr/bin/env bash
# Run every test: unit, property and interop tests against the real peers
# (iscsi-test-cu, iscsi-perf's peers, qemu-io, tgt), then the linter and
# the type checker.
# Installs what is missing first. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
PY=${PYTHON:-python3}
$PY -m pytest -p no:cacheprovider -q -ra "$@"
tests=$?
$PY -m ruff check src tests benchmarks
lint=$?
$PY -m mypy src
types=$?
[ "$tests" -eq 0 ] && [ "$lint" -eq 0 ] && [ "$types" -eq 0 ]
