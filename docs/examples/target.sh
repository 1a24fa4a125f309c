#!/bin/sh
# The shared storage of docs/examples/host.toml: one iSCSI target node with
# one 256 MiB logical unit (the image is created when missing), its
# persistent reservations kept under /var/lib/prmigrate/target (APTPL),
# only the two hosts' initiators allowed.
exec prmigrate target \
  --listen 127.0.0.1:3260 \
  --iqn iqn.2026-11.org.prmigrate:shared \
  --lun 0=/var/lib/prmigrate/shared.img --size 256M \
  --state-dir /var/lib/prmigrate/target \
  --acl iqn.2026-11.org.prmigrate:hosta --acl iqn.2026-11.org.prmigrate:hostb
