#!/usr/bin/env bash
# Build an ext4 root filesystem image from the guest assets' busybox, for virtio-blk
# root-disk tests and for booting with `--disk ROOTFS --cmdline "... vessel.root=/dev/vda"`.
#
#   scripts/rootfs.sh [OUT] [SIZE_MIB]     (default $VESSEL_ASSETS/rootfs.ext4, 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
OUT="${1:-$ASSETS/rootfs.ext4}"
SIZE="${2:-64}"
scripts/guest-assets.sh >/dev/null
command -v mkfs.ext4 >/dev/null || { apt-get install -y -qq e2fsprogs >/dev/null; }

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,mnt,usr/bin,usr/sbin,var}
cp "$ASSETS/busybox" "$root/bin/busybox"
for app in $("$ASSETS/busybox" --list); do
    [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"
done
ln -sf ../bin/busybox "$root/sbin/init"
mkdir -p "$root/etc/init.d"
cat >"$root/etc/init.d/rcS" <<'RC'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -o remount,rw /
echo "vessel-rootfs: $(uname -r) up, root on $(awk '$2 == "/" {print $1}' /proc/mounts | tail -n1)"
# The initramfs loaded button.ko and evdev.ko: the ACPI power button shuts down cleanly.
if [ -e /dev/input/event0 ]; then
    mkdir -p /var/log /var/run
    acpid
fi
RC
chmod +x "$root/etc/init.d/rcS"
cat >"$root/etc/inittab" <<'TAB'
::sysinit:/etc/init.d/rcS
ttyS0::respawn:/bin/sh
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/umount -a -r
TAB
mkdir -p "$root/etc/acpi"
echo 'PWRF power' >"$root/etc/acpid.conf"
cat >"$root/etc/acpi/power" <<'PWR'
#!/bin/sh
echo "vessel-rootfs: power button pressed, shutting down" >/dev/console
poweroff
PWR
chmod +x "$root/etc/acpi/power"
echo 'export PS1="rootfs # "' >"$root/etc/profile"
rm -f "$OUT.tmp"
mkfs.ext4 -q -F -L vessel-root -d "$root" "$OUT.tmp" "${SIZE}M"
mv "$OUT.tmp" "$OUT"
echo "rootfs: $OUT (${SIZE} MiB ext4)"
