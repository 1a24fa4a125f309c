#!/usr/bin/env bash
# Install everything prmigrate needs on a fresh Debian machine: the real peers
# from Debian packages (libiscsi-bin, tgt, qemu-utils, qemu-block-extra,
# tshark; systemd for systemd-analyze) and the package itself with its dev
# tools. Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v iscsi-test-cu >/dev/null 2>&1 || need_apt+=(libiscsi-bin)
command -v tgtd >/dev/null 2>&1 || need_apt+=(tgt)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || ls /usr/lib/*/qemu/block-iscsi.so >/dev/null 2>&1 || need_apt+=(qemu-block-extra)
command -v tshark >/dev/null 2>&1 || need_apt+=(tshark)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v man >/dev/null 2>&1 || need_apt+=(man-db)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # the migration TLS test makes its certificates
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! $PY -c 'import prmigrate, google_crc32c, pytest, hypothesis, pytest_timeout, mypy, ruff, argparse_manpage, shtab, wheel, qemu.qmp' >/dev/null 2>&1 \
   || [ "$($PY -c 'import prmigrate,os;print(os.path.realpath(prmigrate.__file__))' 2>/dev/null)" != "$(realpath src/prmigrate/__init__.py)" ]; then
  echo "bootstrap: installing prmigrate and its Python dependencies"
  $PY -m pip install -q --disable-pip-version-check -e '.[dev,fast]'
fi
