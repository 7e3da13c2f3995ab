#!/usr/bin/env bash
# Fetch the riscv64 guest assets: Debian's riscv64 kernel (an Image) and a busybox
# initramfs carrying the kernel's virtio modules, both from Debian's riscv64 packages.
# Nothing here is committed; the result is cached under $VESSEL_ASSETS/riscv64 (default
# ~/.cache/vessel/assets/riscv64), where `vessel run --arch riscv64` and the tests look.
#
#   scripts/riscv-assets.sh          fetch (no-op when the cache is complete and current)
#   scripts/riscv-assets.sh --force  fetch again
#
# riscv64 is an official Debian architecture from trixie on. The host's own apt setup is
# left alone: apt runs against a private state folder that lists only trixie/riscv64.
set -euo pipefail

ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}/riscv64"
SUITE="${VESSEL_RISCV_SUITE:-trixie}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
# shellcheck source=scripts/module-order.sh
. "$(dirname "${BASH_SOURCE[0]}")/module-order.sh"
STAMP="$(cat "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/module-order.sh" | sha256sum | cut -d' ' -f1)"

if [ $FORCE = 0 ] && [ -s "$ASSETS/Image" ] && [ -s "$ASSETS/initramfs.cpio.gz" ] &&
    [ "$(cat "$ASSETS/assets-stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "riscv64 assets: up to date in $ASSETS"
    exit 0
fi

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for tool in apt-get dpkg-deb cpio gzip xz zstd strings; do need "$tool" || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "riscv64 assets: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq cpio gzip xz-utils zstd binutils >/dev/null
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -s "$keyring" ] || apt-get install -y -qq debian-archive-keyring >/dev/null

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# A private apt: its own sources, lists, cache and (empty) dpkg status.
mkdir -p apt/lists/partial apt/cache/archives/partial apt/parts apt/prefs
echo "deb [arch=riscv64 signed-by=$keyring] http://deb.debian.org/debian $SUITE main" >apt/sources.list
: >apt/status
APT=(-o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts="$work/apt/parts"
     -o Dir::Etc::Preferences="$work/apt/prefs/none" -o Dir::Etc::PreferencesParts="$work/apt/prefs"
     -o Dir::State::Lists="$work/apt/lists" -o Dir::State::status="$work/apt/status"
     -o Dir::Cache="$work/apt/cache" -o APT::Architecture=riscv64 -o APT::Architectures=riscv64
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${APT[@]}" update -qq
kpkg="$(apt-cache "${APT[@]}" depends linux-image-riscv64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$kpkg" ] || { echo "riscv64 assets: cannot resolve linux-image-riscv64 in $SUITE" >&2; exit 1; }
echo "riscv64 assets: fetching $kpkg and busybox-static ($SUITE, riscv64)"
apt-get "${APT[@]}" download -qq "$kpkg:riscv64" busybox-static:riscv64
dpkg-deb -x ./"$kpkg"_*.deb kernel
dpkg-deb -x ./busybox-static_*.deb bb

# trixie ships modules under /usr/lib (merged /usr); older packages under /lib.
modroot=kernel/usr/lib/modules
[ -d "$modroot" ] || modroot=kernel/lib/modules
kver="$(ls "$modroot" | head -n1)"
moddir="$modroot/$kver"
find "$moddir" -name '*.ko.xz' -exec xz -d {} +
find "$moddir" -name '*.ko.zst' -exec zstd -q --rm -d {} +

# Load order: a depth-first walk of each module's modinfo `depends=`.
wanted=(virtio_mmio virtio_blk virtio_net virtio_console virtio-rng ext4 crc32c_generic)
module_order "$moddir" "${wanted[@]}"

root="$work/initramfs"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,mnt,root,usr/bin,usr/sbin,var/log,var/run}
# /usr/bin in trixie (merged /usr), /bin before.
bbbin=""
for c in bb/usr/bin/busybox bb/bin/busybox; do [ -x "$c" ] && bbbin="$c" && break; done
[ -n "$bbbin" ] || { echo "riscv64 assets: no busybox in busybox-static" >&2; exit 1; }
cp "$bbbin" "$root/bin/busybox"
for ko in "${order[@]}"; do
    cp "$ko" "$root/lib/modules/"
    basename "$ko" >>"$root/lib/modules/load-order"
done
touch "$root/lib/modules/load-order"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r ko; do insmod "/lib/modules/$ko" 2>/dev/null; done </lib/modules/load-order
hostname vessel
echo "vessel-init: $(uname -m) $(uname -r) up, $(nproc) cpu(s)"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vessel.run=*) run="${arg#vessel.run=}" ;;
    esac
done
if [ -n "${run:-}" ]; then
    sh -c "$(echo "$run" | tr '+' ' ')"
    poweroff -f
fi
while true; do
    setsid cttyhack sh -l
done
INIT
chmod +x "$root/init"
echo 'export PS1="~ # "' >"$root/etc/profile"

mkdir -p "$ASSETS"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -9 >"$ASSETS/initramfs.cpio.gz.tmp"
# Debian's riscv64 package ships the kernel as /boot/vmlinux-VER (an Image, maybe
# compressed); the VMM loads a flat Image.
img=""
for c in kernel/boot/vmlinux-"$kver" kernel/boot/vmlinuz-"$kver"; do [ -s "$c" ] && img="$c" && break; done
[ -n "$img" ] || { echo "riscv64 assets: no kernel image in $kpkg" >&2; exit 1; }
case "$(head -c 4 "$img" | od -An -tx1 | tr -d ' ')" in
    1f8b*) gzip -dc "$img" >"$ASSETS/Image.tmp" ;;
    *) cp "$img" "$ASSETS/Image.tmp" ;;
esac
cp kernel/boot/config-"$kver" "$ASSETS/config"
# Symbols, for reading a guest PC when a boot stalls.
cp kernel/boot/System.map-"$kver" "$ASSETS/System.map" 2>/dev/null || true
mv "$ASSETS/initramfs.cpio.gz.tmp" "$ASSETS/initramfs.cpio.gz"
mv "$ASSETS/Image.tmp" "$ASSETS/Image"
echo "$kver" >"$ASSETS/kernel-version"
echo "$STAMP" >"$ASSETS/assets-stamp"
echo "riscv64 assets: kernel $kver, $(wc -l <"$root/lib/modules/load-order") modules -> $ASSETS"
