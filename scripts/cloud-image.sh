#!/usr/bin/env bash
# Build a Debian bookworm cloud-style disk image, the kind users of OpenStack and libvirt
# boot: GPT with a BIOS boot partition and an EFI system partition, an ext4 root with
# Debian's cloud kernel (linux-image-cloud-amd64) and its initramfs, GRUB for BIOS and
# for EFI, cloud-init (NoCloud and the usual datasources) and openssh-server. Output:
# qcow2, cached in the guest assets folder ($VESSEL_ASSETS, default
# ~/.cache/vessel/assets) as debian-bookworm-cloud.qcow2.
#
#   scripts/cloud-image.sh          build (no-op when the image is current)
#   scripts/cloud-image.sh --force  build again
#
# Boot it through SeaBIOS and GRUB with a cloud-init seed (treat the image as a base:
# boot a qcow2 overlay on it, or QEMU's -snapshot):
#
#   vessel run --accel emu --memory 1G --disk OVERLAY.qcow2,format=qcow2 --cloud-init user-data=FILE
#
# Everything in it is Debian's, installed with debootstrap; GRUB is placed without
# grub-install (which needs a block device): its i386-pc core image goes into the BIOS
# boot partition with the two sector numbers grub-install would patch (boot.img's
# kernel sector, diskboot.img's block list), and a standalone x86_64-efi image becomes
# the ESP's \EFI\BOOT\BOOTX64.EFI. No loop devices and no mounts: the file systems are
# filled with mkfs.ext4 -d and mtools, the partition table written by sfdisk.
#
# The image is current when debian-bookworm-cloud.stamp holds this script's SHA-256.
# Needs root (debootstrap chroots); installs debootstrap, fdisk, dosfstools, mtools,
# grub-pc-bin, grub-efi-amd64-bin and qemu-utils when missing. Packages come from the
# mirror apt uses here, or DEBIAN_MIRROR; debootstrap's package cache is shared with
# scripts/debian-rootfs.sh.
set -euo pipefail

ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
OUT="$ASSETS/debian-bookworm-cloud.qcow2"
STAMP_FILE="$ASSETS/debian-bookworm-cloud.stamp"
SIZE_MIB="${CLOUD_IMAGE_MIB:-3072}"
SUITE=bookworm
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
STAMP="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if [ $FORCE = 0 ] && [ -s "$OUT" ] && [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$STAMP" ]; then
    echo "cloud image: up to date in $OUT"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "cloud image: debootstrap needs root (it chroots into the new system); run as root" >&2
    exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need debootstrap || missing+=(debootstrap)
need mkfs.ext4 || missing+=(e2fsprogs)
need sfdisk || missing+=(fdisk)
need mkfs.vfat || missing+=(dosfstools)
need mcopy || missing+=(mtools)
need qemu-img || missing+=(qemu-utils)
need grub-mkimage || missing+=(grub-common)
[ -f /usr/lib/grub/i386-pc/boot.img ] || missing+=(grub-pc-bin)
[ -d /usr/lib/grub/x86_64-efi ] || missing+=(grub-efi-amd64-bin)
if [ ${#missing[@]} -gt 0 ]; then
    echo "cloud image: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The mirror apt uses here (the same lookup as scripts/debian-rootfs.sh).
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(python3 - <<'PY'
import glob, re
def deb822(path):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and "bookworm" in fields.get("suites", []) \
                and fields.get("enabled", ["yes"])[0] != "no":
            for uri in fields.get("uris", []):
                return uri
def oneline(path):
    for line in open(path):
        parts = line.split("#", 1)[0].split()
        parts = [p for p in parts if not p.startswith("[")]
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
            return parts[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    uri = deb822(path)
    if uri:
        print(uri); break
else:
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        try:
            uri = oneline(path)
        except OSError:
            continue
        if uri:
            print(uri); break
    else:
        print("http://deb.debian.org/debian")
PY
)"
fi

# What Debian's genericcloud image has that matters for booting and configuring it.
packages=(linux-image-cloud-amd64 initramfs-tools systemd systemd-sysv udev dbus
          libpam-systemd cloud-init cloud-guest-utils openssh-server ifupdown
          isc-dhcp-client iproute2 netbase sudo e2fsprogs procps kmod less
          # debootstrap does not resolve virtual packages: python3-cryptography's
          # python3-cffi-backend-api-* come from this one.
          python3-cffi-backend)
include="$(IFS=,; echo "${packages[*]}")"

mkdir -p "$ASSETS"
work="$(mktemp -d "$ASSETS/.cloud-image.XXXXXX")"
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$work/root/$m" 2>/dev/null && umount -l "$work/root/$m" || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
cache="$ASSETS/debootstrap-cache"
mkdir -p "$cache"

t0=$(date +%s)
echo "cloud image: debootstrap $SUITE (minbase + ${packages[*]}) from $mirror"
if ! debootstrap --variant=minbase --include="$include" --cache-dir="$cache" \
        "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    echo "cloud image: debootstrap failed" >&2
    exit 1
fi
echo "cloud image: debootstrap took $(($(date +%s) - t0)) s"

kver="$(ls "$root/lib/modules" | head -n1)"
[ -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] || {
    echo "cloud image: no kernel or initramfs in /boot (kernel $kver)" >&2
    exit 1
}

# Identities the file systems, fstab and grub.cfg share.
root_uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
esp_id="$(python3 -c 'import random; print("%08X" % random.getrandbits(32))')"
esp_uuid="${esp_id:0:4}-${esp_id:4:4}"
cmdline="root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200n8"

# --- configuration: what Debian's cloud images configure, as files ---
echo localhost >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
EOF
cat >"$root/etc/fstab" <<EOF
UUID=$root_uuid	/	ext4	rw,discard,errors=remount-ro,x-systemd.growfs	0	1
UUID=$esp_uuid	/boot/efi	vfat	defaults	0	0
EOF
mkdir -p "$root/boot/efi"
# An empty machine-id: each instance makes its own on first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
echo Etc/UTC >"$root/etc/timezone"
# Network: cloud-init renders the interfaces (ifupdown) from the datasource.
cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
EOF
# cloud-init's default locale (en_US.UTF-8) needs the locales package and a locale-gen
# run; C.UTF-8 is built into glibc.
mkdir -p "$root/etc/cloud/cloud.cfg.d"
printf 'locale: C.UTF-8\n' >"$root/etc/cloud/cloud.cfg.d/01_locale.cfg"
# No host keys baked into the image: cloud-init makes them per instance.
rm -f "$root"/etc/ssh/ssh_host_*
# Nothing that prompts on the console or wakes up later to do background work.
for unit in systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
        e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
mkdir -p "$root/etc/vessel"
echo "Debian $SUITE cloud image built by scripts/cloud-image.sh $STAMP" >"$root/etc/vessel/image"

# GRUB's configuration, as Debian's update-grub writes it for a cloud image: the 32-bit
# `linux` entry, the kernel on both consoles.
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<EOF
set default=0
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
search --no-floppy --fs-uuid --set=root $root_uuid
menuentry 'Debian GNU/Linux' {
    echo 'Loading Linux $kver ...'
    linux /boot/vmlinuz-$kver $cmdline
    echo 'Loading initial ramdisk ...'
    initrd /boot/initrd.img-$kver
}
EOF

rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/debootstrap"

# --- the disk: GPT, 1 MiB BIOS boot, 63 MiB ESP, the rest ext4 root ---
disk="$work/disk.raw"
truncate -s "${SIZE_MIB}M" "$disk"
bios_lba=2048
esp_lba=4096 esp_sectors=129024
root_lba=133120
# Up to the last whole MiB: the backup GPT takes the disk's last 33 sectors.
root_sectors=$(( SIZE_MIB * 2048 - root_lba - 2048 ))
sfdisk -q "$disk" <<EOF
label: gpt
start=$bios_lba, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="bios"
start=$esp_lba, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$root_lba, size=$root_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
EOF

# Root file system.
echo "cloud image: $(du -sh "$root" | cut -f1) installed; ext4 root of $((root_sectors / 2048)) MiB"
truncate -s $(( root_sectors * 512 )) "$work/root.ext4"
mkfs.ext4 -q -F -L cloudimg-rootfs -U "$root_uuid" -d "$root" "$work/root.ext4"
dd if="$work/root.ext4" of="$disk" bs=1M seek=$(( root_lba / 2048 )) conv=notrunc,sparse status=none

# GRUB for BIOS: the modules grub.cfg needs, built into core.img, which finds
# /boot/grub on the root partition.
grub-mkimage -O i386-pc -o "$work/core.img" -p "(hd0,gpt3)/boot/grub" \
    biosdisk part_gpt ext2 normal configfile linux search search_fs_uuid echo test \
    serial terminal gzio
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
[ "$core_sectors" -le 2048 ] || { echo "cloud image: core.img does not fit the BIOS boot partition" >&2; exit 1; }
le64() {
    python3 -c 'import struct,sys; sys.stdout.buffer.write(struct.pack("<Q", int(sys.argv[1])))' "$1"
}
# diskboot.img (core.img's first sector) reads the rest from its block list's start.
le64 $(( bios_lba + 1 )) | dd of="$work/core.img" bs=1 seek=500 conv=notrunc status=none
dd if="$work/core.img" of="$disk" bs=512 seek=$bios_lba conv=notrunc status=none
# boot.img's code in the protective MBR (keeping its partition table), pointed at
# core.img's first sector (GRUB_BOOT_MACHINE_KERNEL_SECTOR, offset 0x5c).
dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
le64 $bios_lba | dd of="$disk" bs=1 seek=$((0x5c)) conv=notrunc status=none

# GRUB for EFI: a standalone image whose first config finds the root partition and
# reads the same grub.cfg.
cat >"$work/efi-early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EOF
grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -p /boot/grub -c "$work/efi-early.cfg" \
    part_gpt ext2 fat normal configfile linux search search_fs_uuid echo test serial \
    terminal gzio efi_gop all_video
truncate -s $(( esp_sectors * 512 )) "$work/esp.vfat"
mkfs.vfat -n EFI -i "$esp_id" "$work/esp.vfat" >/dev/null
MTOOLS_SKIP_CHECK=1 mmd -i "$work/esp.vfat" ::/EFI ::/EFI/BOOT
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/esp.vfat" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
dd if="$work/esp.vfat" of="$disk" bs=512 seek=$esp_lba conv=notrunc status=none

rm -f "$OUT.tmp"
qemu-img convert -f raw -O qcow2 "$disk" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$STAMP" >"$STAMP_FILE"
echo "cloud image: $OUT ready ($(du -h "$OUT" | cut -f1), kernel $kver) in $(($(date +%s) - t0)) s"
