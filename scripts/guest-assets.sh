#!/usr/bin/env bash
# Fetch the guest assets Vessel boots: Debian's current cloud kernel and a busybox
# initramfs that carries the kernel's virtio modules. Nothing here is committed; the
# result is cached under $VESSEL_ASSETS (default ~/.cache/vessel/assets), where
# `vessel run` and the tests look by default.
#
#   scripts/guest-assets.sh          fetch (no-op when the cache is complete and current)
#   scripts/guest-assets.sh --force  fetch again
#
# The cache is current when its `assets-stamp` holds this script's SHA-256: any change to
# what the script builds (modules, /init) rebuilds it on every machine, CI included.
set -euo pipefail

ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"

# The README's run command builds Vessel right after this script, and the etcd client crate
# compiles etcd's protobuf files with protoc at build time: a fresh machine lacks it.
if ! command -v protoc >/dev/null 2>&1; then
    echo "guest assets: installing protobuf-compiler (protoc builds Vessel's etcd client)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi

FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
# shellcheck source=scripts/module-order.sh
. "$(dirname "${BASH_SOURCE[0]}")/module-order.sh"
STAMP="$(cat "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/module-order.sh" | sha256sum | cut -d' ' -f1)"

if [ $FORCE = 0 ] && [ -s "$ASSETS/vmlinuz" ] && [ -s "$ASSETS/initramfs.cpio.gz" ] && [ -s "$ASSETS/vmlinux" ] &&
    [ "$(cat "$ASSETS/assets-stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "guest assets: up to date in $ASSETS"
    exit 0
fi

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for tool in apt-get dpkg-deb cpio gzip xz zstd lz4 strings python3; do need "$tool" || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "guest assets: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq cpio gzip xz-utils zstd lz4 binutils python3 >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# The metapackage names the versioned image package; resolve it so we fetch the current one.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi
kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
[ -n "$kpkg" ] || { echo "guest assets: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
echo "guest assets: fetching $kpkg and busybox-static"
apt-get download -qq "$kpkg" busybox-static
dpkg-deb -x ./"$kpkg"_*.deb kernel
dpkg-deb -x ./busybox-static_*.deb bb

kver="$(ls kernel/lib/modules | head -n1)"
moddir="kernel/lib/modules/$kver"

# Modules may ship compressed; busybox insmod wants plain ELF.
find "$moddir" -name '*.ko.xz' -exec xz -d {} +
find "$moddir" -name '*.ko.zst' -exec zstd -q --rm -d {} +

# Each .ko names what it needs in its modinfo `depends=` field (there is no modules.dep in
# the package): load order is a depth-first walk of that graph.
# button and evdev: the ACPI power button (PNP0C0C) as /dev/input/event*, for acpid.
# virtio_balloon: the memory balloon (Firecracker's /balloon, libvirt's <memballoon>).
wanted=(virtio_mmio virtio_pci virtio_blk virtio_net virtio_console virtio-rng virtio_balloon
        vmw_vsock_virtio_transport vsock_loopback ext4 crc32c_generic button evdev)
module_order "$moddir" "${wanted[@]}"

root="$work/initramfs"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc/acpi,lib/modules,mnt,root,usr/bin,usr/sbin,var/log,var/run}
cp bb/bin/busybox "$root/bin/busybox"
for ko in "${order[@]}"; do
    cp "$ko" "$root/lib/modules/"
    basename "$ko" >>"$root/lib/modules/load-order"
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
if [ -f /lib/modules/load-order ]; then
    while read -r ko; do insmod "/lib/modules/$ko" 2>/dev/null; done </lib/modules/load-order
fi
hostname vessel
echo "vessel-init: $(uname -r) up, $(nproc) cpu(s)"
# Optional root switch: root=/dev/vda (or any block device) on the kernel command line.
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vessel.root=*) newroot="${arg#vessel.root=}" ;;
        vessel.run=*) run="${arg#vessel.run=}" ;;
    esac
done
if [ -n "${newroot:-}" ] && mount "$newroot" /mnt; then
    mount --move /dev /mnt/dev 2>/dev/null
    exec switch_root /mnt /sbin/init
fi
# The ACPI power button (the VMM's shutdown request) arrives as KEY_POWER on an evdev
# node; busybox acpid runs /etc/acpi/power for it (see /etc/acpid.conf).
if [ -e /dev/input/event0 ]; then
    acpid
fi
if [ -n "${run:-}" ]; then
    sh -c "$(echo "$run" | tr '+' ' ')"
    poweroff -f
fi
while true; do
    setsid cttyhack sh -l
done
INIT
chmod +x "$root/init"
# busybox acpid: each line is "KEY HANDLER"; an event whose description contains KEY
# (KEY_POWER is "button/power PWRF 00000080") runs HANDLER, relative to /etc/acpi.
cat >"$root/etc/acpid.conf" <<'CONF'
PWRF power
CONF
cat >"$root/etc/acpi/power" <<'POWER'
#!/bin/sh
echo "vessel-init: power button pressed, powering off" >/dev/console
sync
poweroff -f
POWER
chmod +x "$root/etc/acpi/power"
echo 'export PS1="~ # "' >"$root/etc/profile"

mkdir -p "$ASSETS"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -9 >"$ASSETS/initramfs.cpio.gz.tmp"
cp kernel/boot/vmlinuz-"$kver" "$ASSETS/vmlinuz.tmp"
cp kernel/boot/config-"$kver" "$ASSETS/config"
cp bb/bin/busybox "$ASSETS/busybox"
# An uncompressed ELF vmlinux for the ELF and PVH paths, extracted from the bzImage payload.
python3 - "$ASSETS/vmlinuz.tmp" "$ASSETS/vmlinux.tmp" <<'PY'
import sys, struct, subprocess
data = open(sys.argv[1], 'rb').read()
setup_sects = data[0x1f1] or 4
off = struct.unpack_from('<I', data, 0x248)[0]
length = struct.unpack_from('<I', data, 0x24c)[0]
payload = data[(setup_sects + 1) * 512 + off:][:length]
magics = {b'\x02\x21\x4c\x18': ['lz4', '-dc'], b'\x1f\x8b': ['gzip', '-dc'],
          b'\xfd7zXZ': ['xz', '-dc'], b'\x28\xb5\x2f\xfd': ['zstd', '-dc']}
for magic, cmd in magics.items():
    if payload.startswith(magic):
        break
else:
    sys.exit('unknown kernel payload compression')
out = subprocess.run(cmd, input=payload, capture_output=True).stdout
if not out.startswith(b'\x7fELF'):
    sys.exit('payload did not decompress to an ELF vmlinux (%s)' % cmd[0])
open(sys.argv[2], 'wb').write(out)
PY
mv "$ASSETS/initramfs.cpio.gz.tmp" "$ASSETS/initramfs.cpio.gz"
mv "$ASSETS/vmlinuz.tmp" "$ASSETS/vmlinuz"
mv "$ASSETS/vmlinux.tmp" "$ASSETS/vmlinux"
echo "$kver" >"$ASSETS/kernel-version"
echo "$STAMP" >"$ASSETS/assets-stamp"
echo "guest assets: kernel $kver, $(wc -l <"$root/lib/modules/load-order") modules -> $ASSETS"
