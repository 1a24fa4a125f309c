#!/usr/bin/env bash
# Build the small Linux guest the VM tests and benchmark boot, once, and cache it.
#
#   bash scripts/build-guest.sh        # prints the cache directory
#
# Output in $PRMIGRATE_GUEST_CACHE (default /var/cache/prmigrate-guest):
#   vmlinuz     Debian's linux-image-cloud-amd64 kernel
#   initrd.img  busybox (static), open-iscsi (iscsid, iscsiadm), sg3-utils,
#               the kernel modules for virtio-scsi, virtio-net and iSCSI, and
#               the test program prm-io (scripts/guest/prm-io.c, built static)
#               run from /init (scripts/guest/init)
#   stamp       hash of this recipe: a changed recipe rebuilds
# Everything comes from Debian packages through apt (apt-get download and
# dpkg-deb -x: nothing is installed into the host's system for the guest).
# Host tools installed when missing: qemu-system-x86, gcc, libc6-dev, cpio, kmod.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${PRMIGRATE_GUEST_CACHE:-/var/cache/prmigrate-guest}
GUEST_DEBS="linux-image-cloud-amd64 busybox-static open-iscsi libopeniscsiusr libisns0 sg3-utils libsgutils2-1.46-2"
# Modules the guest loads, in this order after their dependencies.
MODULES="virtio virtio_ring virtio_pci virtio_net virtio_scsi scsi_mod sd_mod sg scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp crc32c_generic"

STAMP=$(cat "${BASH_SOURCE[0]}" "$HERE"/guest/* | sha256sum | cut -c1-16)

if [[ -f $CACHE/stamp && $(cat "$CACHE/stamp") == "$STAMP" && -s $CACHE/vmlinuz && -s $CACHE/initrd.img ]]; then
    echo "$CACHE"
    exit 0
fi

need_host=()
command -v qemu-system-x86_64 >/dev/null || need_host+=(qemu-system-x86)
command -v gcc >/dev/null || need_host+=(gcc)
[[ -f /usr/include/stdio.h ]] || need_host+=(libc6-dev)
command -v cpio >/dev/null || need_host+=(cpio)
command -v depmod >/dev/null || need_host+=(kmod)
if ((${#need_host[@]})); then
    echo "build-guest: installing ${need_host[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_host[@]}" >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_host[@]}" >&2; }
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 600 9
# another build may have finished while we waited for the lock
if [[ -f $CACHE/stamp && $(cat "$CACHE/stamp") == "$STAMP" && -s $CACHE/vmlinuz && -s $CACHE/initrd.img ]]; then
    echo "$CACHE"
    exit 0
fi

WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/x" "$WORK/root"

# the kernel meta package names the versioned image package
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $KPKG ]]; then
    apt-get update >&2
    KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
echo "build-guest: downloading $KPKG $GUEST_DEBS" >&2
(cd "$WORK/debs" && apt-get download "$KPKG" $GUEST_DEBS >&2 2>"$WORK/download.log") \
    || { apt-get update >&2 && (cd "$WORK/debs" && apt-get download "$KPKG" $GUEST_DEBS >&2); }
for d in "$WORK"/debs/*.deb; do dpkg-deb -x "$d" "$WORK/x"; done

KVER=$(ls "$WORK/x/lib/modules")
R=$WORK/root
mkdir -p "$R"/{bin,sbin,etc/iscsi,lib/modules,lib64,lib/x86_64-linux-gnu,proc,sys,dev,run,tmp,var/lib/iscsi}
cp "$WORK/x/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# busybox and its applets
cp "$WORK/x/bin/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do
    [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"
done

# open-iscsi, sg3-utils and the shared libraries they need (the packaged
# ones first, then the host's: both are Debian bookworm)
bins=("$WORK/x/sbin/iscsid" "$WORK/x/sbin/iscsiadm" "$WORK/x/usr/bin/sg_persist" "$WORK/x/usr/bin/sg_turs"
      "$WORK/x/usr/bin/sg_inq")
LIBPATH="$WORK/x/lib/x86_64-linux-gnu:$WORK/x/usr/lib/x86_64-linux-gnu"
for b in "${bins[@]}"; do
    rm -f "$R/bin/$(basename "$b")"
    cp "$b" "$R/bin/"
    LD_LIBRARY_PATH=$LIBPATH ldd "$b" | while read -r name arrow path _; do
        if [[ $arrow == "=>" && $path == /* ]]; then
            cp -L "$path" "$R/lib/x86_64-linux-gnu/$name"
        elif [[ $arrow == "=>" ]]; then
            echo "build-guest: $b needs $name, not found" >&2
            exit 1
        fi
    done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
cp "$HERE/guest/iscsid.conf" "$R/etc/iscsi/iscsid.conf"
echo "InitiatorName=iqn.2026-11.org.prmigrate:unset" > "$R/etc/iscsi/initiatorname.iscsi"
# iscsid checks that iscsiadm's peer is root by name
echo "root:x:0:0:root:/:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
printf 'passwd: files\ngroup: files\n' > "$R/etc/nsswitch.conf"

# kernel modules: the listed ones and what they depend on, in load order
depmod -b "$WORK/x" "$KVER"
MODDIR=$WORK/x/lib/modules/$KVER
python3 - "$MODDIR" $MODULES > "$WORK/load.order" <<'PY'
import sys
moddir, wanted = sys.argv[1], sys.argv[2:]
deps = {}
for line in open(f"{moddir}/modules.dep"):
    path, _, rest = line.partition(":")
    deps[path.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")] = (path, rest.split())
by_path = {v[0]: k for k, v in deps.items()}
order, seen = [], set()
def visit(name):
    if name in seen or name not in deps:
        return
    seen.add(name)
    for d in deps[name][1]:
        visit(by_path[d])
    order.append(deps[name][0])
for w in wanted:
    visit(w)
print("\n".join(order))
PY
while read -r m; do
    mkdir -p "$R/lib/modules/$(dirname "$m")"
    cp "$MODDIR/$m" "$R/lib/modules/$m"
done < "$WORK/load.order"
cp "$WORK/load.order" "$R/lib/modules/load.order"

gcc -O2 -static -Wall -o "$R/bin/prm-io" "$HERE/guest/prm-io.c"
install -m 0755 "$HERE/guest/init" "$R/init"

(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.img"

mv "$WORK/vmlinuz" "$CACHE/vmlinuz"
mv "$WORK/initrd.img" "$CACHE/initrd.img"
echo "$KVER" > "$CACHE/kernel-version"
echo "$STAMP" > "$CACHE/stamp"
echo "build-guest: guest $KVER built in $CACHE ($(du -h "$CACHE/initrd.img" | cut -f1) initramfs)" >&2
echo "$CACHE"
