#!/usr/bin/env bash
# Install what is missing, then run the end-to-end demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec ${PYTHON:-python3} -m prmigrate.cli demo "$@"
