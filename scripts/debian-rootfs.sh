#!/usr/bin/env bash
# Build a stock Debian bookworm root filesystem with debootstrap (systemd as init,
# coreutils, bash, python3, openssl, perl, gawk, procps, kmod) into an ext4 image: the
# yardstick guest for the emu CPU and for bench/real.sh. Nothing in it is patched: the
# binaries are Debian's, as apt installs them. Cached in the guest assets folder
# ($VESSEL_ASSETS, default ~/.cache/vessel/assets) as debian-bookworm.ext4.
#
#   scripts/debian-rootfs.sh          build (no-op when the image is current)
#   scripts/debian-rootfs.sh --force  build again
#
# The image is current when debian-bookworm.stamp holds this script's SHA-256, as with
# scripts/guest-assets.sh. Boot it with the guest assets' kernel and initramfs, whose /init
# mounts vessel.root= and switch_roots to its /sbin/init (systemd):
#
#   vessel run --accel emu --memory 1G --disk IMG,format=raw \
#       --cmdline "console=ttyS0 vessel.root=/dev/vda quiet"
#
# The guest logs root in on ttyS0 without a password (agetty --autologin) and shows a
# bash prompt `root@vessel-debian:~# `. Treat the image as a base: the tests and
# bench/real.sh boot a qcow2 overlay on it (or QEMU's -snapshot), never the image itself.
#
# Packages come from the Debian mirror that apt uses on this machine (the first bookworm
# URI in /etc/apt/sources.list*), or DEBIAN_MIRROR. debootstrap needs root (it chroots
# to run the packages' scripts); mkfs.ext4 -d fills the image without a loop mount.
set -euo pipefail

ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
OUT="$ASSETS/debian-bookworm.ext4"
STAMP_FILE="$ASSETS/debian-bookworm.stamp"
SIZE_MIB="${DEBIAN_IMAGE_MIB:-2048}"
SUITE=bookworm
HOSTNAME_GUEST=vessel-debian
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
STAMP="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if [ $FORCE = 0 ] && [ -s "$OUT" ] && [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$STAMP" ]; then
    echo "debian rootfs: up to date in $OUT"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "debian rootfs: debootstrap needs root (it chroots into the new system); run as root" >&2
    exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need debootstrap || missing+=(debootstrap)
need mkfs.ext4 || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
    echo "debian rootfs: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The mirror apt uses here: deb822 .sources files first, then one-line sources.list.
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

# What a user of a minimal Debian system with systemd has, plus the tools the command
# battery and the benchmarks run. dbus and libpam-systemd make logind and the root login
# session work as on an ordinary install.
packages=(systemd systemd-sysv udev dbus libpam-systemd coreutils bash python3 openssl
          perl gawk procps kmod gzip)
include="$(IFS=,; echo "${packages[*]}")"

mkdir -p "$ASSETS"
work="$(mktemp -d "$ASSETS/.debian-rootfs.XXXXXX")"
cleanup() {
    # debootstrap may leave proc/sys mounted inside the chroot on failure.
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
echo "debian rootfs: debootstrap $SUITE (minbase + ${packages[*]}) from $mirror"
if ! debootstrap --variant=minbase --include="$include" --cache-dir="$cache" \
        "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    echo "debian rootfs: debootstrap failed" >&2
    exit 1
fi
echo "debian rootfs: debootstrap took $(($(date +%s) - t0)) s"

# --- configuration (files only; no binary is touched) ---
echo "$HOSTNAME_GUEST" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$HOSTNAME_GUEST
::1		localhost ip6-localhost ip6-loopback
EOF
cat >"$root/etc/fstab" <<'EOF'
# The initramfs mounts vessel.root= (the first virtio disk) read-write before switch_root.
/dev/vda	/	ext4	defaults,errors=remount-ro	0	1
EOF
# A fixed machine-id: every boot of a fresh overlay is otherwise a "first boot"
# (systemd-firstboot would prompt on the console).
printf '%s\n' 5e55e1debb0a4f8c9d1e2f3a4b5c6d7e >"$root/etc/machine-id"
ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
echo Etc/UTC >"$root/etc/timezone"
# Root: no password (the serial console logs in automatically in any case).
sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"

# Root logs in on the serial console by itself: agetty --autologin. It still prints
# "<host> login: root (automatic login)", then bash's prompt "root@vessel-debian:~# ".
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
# Enabled explicitly as well (the getty generator does it for console=ttyS0 too).
mkdir -p "$root/etc/systemd/system/getty.target.wants"
ln -sf /lib/systemd/system/serial-getty@.service \
    "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"

# Nothing that waits for a network the guest does not have, prompts, or wakes up later
# to do background work that would disturb a measurement.
for unit in systemd-networkd-wait-online.service systemd-firstboot.service \
        apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
        e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# The kernel's modules are not in this image: the guest assets' initramfs loads what the
# disk needs before switch_root. Which build of this script made the image:
mkdir -p "$root/etc/vessel"
echo "Debian $SUITE built by scripts/debian-rootfs.sh $STAMP" >"$root/etc/vessel/image"

# A corpus for bench/real.sh's gzip row: 32 MiB of English-like text, the same bytes on
# every build (a seeded generator), so compression work is comparable across runs.
mkdir -p "$root/var/lib/vessel-bench"
python3 - "$root/var/lib/vessel-bench/text-32m.txt" <<'PY'
import random, sys
rng = random.Random(12)
words = ("the of and to in is was that for it as with be on not he by are this at from "
         "his but they have an which or had one you were her all she there would their we "
         "him been has when who will more no if out so said what up its about into than "
         "them can only other new some could time these two may then do first any my now "
         "such like our over man me even most made after also did many before must through "
         "back years where much your way well down should because each just those people "
         "virtual machine emulator instruction register memory kernel device interrupt "
         "table page fault cache block queue descriptor buffer console serial").split()
target = 32 * 1024 * 1024
out, size = [], 0
while size < target:
    n = rng.randint(6, 18)
    s = " ".join(rng.choice(words) for _ in range(n)).capitalize() + ".\n"
    out.append(s)
    size += len(s)
data = "".join(out).encode()[:target]
open(sys.argv[1], "wb").write(data)
PY

# apt's downloaded packages are not part of the system.
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/debootstrap"

echo "debian rootfs: $(du -sh "$root" | cut -f1) installed; making a ${SIZE_MIB} MiB ext4 image"
rm -f "$OUT.tmp"
truncate -s "${SIZE_MIB}M" "$OUT.tmp"
mkfs.ext4 -q -F -L vessel-root -d "$root" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$STAMP" >"$STAMP_FILE"
echo "debian rootfs: $OUT ready in $(($(date +%s) - t0)) s"
