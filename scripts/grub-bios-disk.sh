#!/bin/bash
# Build a raw disk image that boots a given kernel and initrd through GRUB on a PC
# BIOS (SeaBIOS): an MBR with GRUB's boot.img, GRUB's core.img in the gap after it (LBA
# 1 onwards, as grub-install embeds it), and one ext4 partition at 1 MiB holding
# /boot/vmlinuz, /boot/initrd.img and /boot/grub/grub.cfg.
#
# No loop devices, no root: the file system is made with `mkfs.ext4 -d`, the MBR
# written with dd. Needs grub-pc-bin (grub-mkimage and /usr/lib/grub/i386-pc) and
# e2fsprogs.
#
#   scripts/grub-bios-disk.sh OUT.raw KERNEL INITRD 'KERNEL COMMAND LINE'
#
# GRUB_LINUX=linux16 (the default) enters the kernel through its real-mode setup code,
# as QEMU's linuxboot option ROM does; GRUB_LINUX=linux uses GRUB's 32-bit entry, as
# distribution grub.cfg files do (that hand-over leaves the 8259 unmasked: Vessel gives
# firmware boots a full ACPI platform so that Linux masks it; docs/ARCHITECTURE.md, Boot).
set -euo pipefail
linux_cmd="${GRUB_LINUX:-linux16}"
case "$linux_cmd" in
    linux | linux16) ;;
    *) echo "grub-bios-disk.sh: GRUB_LINUX is linux or linux16" >&2; exit 1 ;;
esac
initrd_cmd="${linux_cmd/linux/initrd}"

out="$1" kernel="$2" initrd="$3" cmdline="$4"
grub_dir=/usr/lib/grub/i386-pc
command -v grub-mkimage >/dev/null && [ -f "$grub_dir/boot.img" ] || {
    echo "grub-bios-disk.sh: needs GRUB for BIOS: apt-get install grub-pc-bin" >&2
    exit 1
}
command -v mkfs.ext4 >/dev/null || {
    echo "grub-bios-disk.sh: needs mkfs.ext4: apt-get install e2fsprogs" >&2
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/boot/grub"
cp "$kernel" "$work/root/boot/vmlinuz"
cp "$initrd" "$work/root/boot/initrd.img"
cat >"$work/root/boot/grub/grub.cfg" <<CFG
set timeout=0
menuentry 'Debian GNU/Linux (Vessel test disk)' {
    echo 'vessel-grub: loading the kernel'
    $linux_cmd /boot/vmlinuz $cmdline
    $initrd_cmd /boot/initrd.img
}
CFG

# The partition: the files plus room for ext4's own structures.
bytes=$(( $(stat -c %s "$kernel") + $(stat -c %s "$initrd") ))
part_mib=$(( bytes / 1048576 + 16 ))
truncate -s "${part_mib}M" "$work/part.ext4"
mkfs.ext4 -q -F -L vessel-boot -d "$work/root" "$work/part.ext4"

# core.img: the modules to read an MBR-partitioned disk through the BIOS and an ext4
# file system, and to run grub.cfg and Linux. Its first sector (diskboot.img) loads the
# rest from LBA 2 on; boot.img loads that first sector from LBA 1.
grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal configfile "$linux_cmd" echo test
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
[ "$core_sectors" -lt 2047 ] || { echo "core.img does not fit before 1 MiB" >&2; exit 1; }

rm -f "$out"
truncate -s "$(( 1 + part_mib ))M" "$out"
# boot.img's code, up to where the MBR's disk signature and partition table begin.
dd if="$grub_dir/boot.img" of="$out" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none
# Partition 1: active, type 0x83 (Linux), LBA 2048 on, CHS fields saying "use LBA".
le32() {
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(( $1 & 255 )) $(( ($1 >> 8) & 255 )) \
        $(( ($1 >> 16) & 255 )) $(( ($1 >> 24) & 255 )))"
}
{
    printf '\x80\xfe\xff\xff\x83\xfe\xff\xff'
    le32 2048
    le32 $(( part_mib * 2048 ))
} | dd of="$out" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$out" bs=1 seek=510 conv=notrunc status=none
dd if="$work/part.ext4" of="$out" bs=1M seek=1 conv=notrunc status=none
