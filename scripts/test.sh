#!/usr/bin/env bash
# Set up and run Vessel's test suite on a fresh Debian machine of this project's kind:
# installs the Debian packages the tests use, fetches the guest assets, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=()
command -v qemu-img >/dev/null 2>&1 || pkgs+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null 2>&1 || pkgs+=(qemu-system-x86)
command -v curl >/dev/null 2>&1 || pkgs+=(curl)
command -v dnsmasq >/dev/null 2>&1 || pkgs+=(dnsmasq-base)
# Overlay networks (cluster) fence DHCP and the gateway in with a bridge nftables table.
command -v nft >/dev/null 2>&1 || pkgs+=(nftables)
command -v iptables >/dev/null 2>&1 || pkgs+=(iptables)
command -v mkfs.ext4 >/dev/null 2>&1 || pkgs+=(e2fsprogs)
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
# The Debian guest test builds a static -march=x86-64-v3 program on the host.
command -v gcc >/dev/null 2>&1 || pkgs+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || pkgs+=(libc6-dev)
# Firmware boot tests: Debian's SeaBIOS, QEMU's linuxboot option ROM, GRUB for BIOS
# (binaries only: grub-pc-bin installs nothing on the host's own disk).
[ -e /usr/share/seabios/bios.bin ] || pkgs+=(seabios)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || pkgs+=(ovmf)
[ -e /usr/share/qemu/linuxboot.bin ] || pkgs+=(qemu-system-data)
[ -d /usr/lib/grub/i386-pc ] || pkgs+=(grub-pc-bin)
# The cloud image (scripts/cloud-image.sh) and its tests: the partition table, the ESP,
# GRUB for EFI, and ssh to log in to the guest.
command -v sfdisk >/dev/null 2>&1 || pkgs+=(fdisk)
command -v mkfs.vfat >/dev/null 2>&1 || pkgs+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || pkgs+=(mtools)
[ -d /usr/lib/grub/x86_64-efi ] || pkgs+=(grub-efi-amd64-bin)
command -v ssh >/dev/null 2>&1 || pkgs+=(openssh-client)
# riscv64 (crates/rv64emu): its instruction tests assemble with Debian's riscv64 binutils
# and compare against qemu-riscv64; the riscv64 guest boots Debian's OpenSBI and is
# benchmarked beside qemu-system-riscv64.
command -v riscv64-linux-gnu-as >/dev/null 2>&1 || pkgs+=(binutils-riscv64-linux-gnu)
command -v qemu-riscv64 >/dev/null 2>&1 || pkgs+=(qemu-user)
[ -e /usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin ] || pkgs+=(opensbi)
command -v qemu-system-riscv64 >/dev/null 2>&1 || pkgs+=(qemu-system-misc)
# libvirt's schema checker: domain dumps must validate (manager xml tests).
command -v virt-xml-validate >/dev/null 2>&1 || pkgs+=(libvirt-clients)
command -v xmllint >/dev/null 2>&1 || pkgs+=(libxml2-utils)
# The cluster tests (tests/cluster.rs) run three etcd members; the etcd client crate
# compiles etcd's protobuf files with protoc at build time.
command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || pkgs+=(etcd-client)
command -v protoc >/dev/null 2>&1 || pkgs+=(protobuf-compiler)
# The etcd TLS test makes its CA and certificates with the openssl CLI.
command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
# The dashboard's browser test drives Debian's Chromium headless (tests/dashboard.rs).
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
for tool in cpio lz4 xz zstd strings; do
    command -v "$tool" >/dev/null 2>&1 || pkgs+=("$tool")
done
if [ ${#pkgs[@]} -gt 0 ]; then
    pkgs=("${pkgs[@]/#xz/xz-utils}")
    pkgs=("${pkgs[@]/#strings/binutils}")
    apt-get update -qq
    # A machine may carry a newer qemu-utils backport than the Debian suite's QEMU, and the
    # backport Breaks the suite's qemu-system-common: take the whole QEMU family from one
    # version, the suite's (the project's QEMU references are that QEMU).
    if [[ " ${pkgs[*]} " == *" qemu-"* ]]; then
        have=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
        want=$(apt-cache policy qemu-system-common | awk '/Candidate:/ {print $2}')
        if [ -n "$have" ] && [ -n "$want" ] && [ "$have" != "$want" ]; then
            pkgs+=("qemu-utils=$want")
        fi
    fi
    echo "test.sh: installing ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${pkgs[@]}" >/dev/null
fi
# Debian's qemu-system-x86 can replace a newer qemu-utils backport with nothing: make
# sure qemu-img is still there.
if ! command -v qemu-img >/dev/null 2>&1; then
    echo "test.sh: installing qemu-utils"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi
command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
}

# What CI enforces: formatting and a clean clippy.
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

scripts/guest-assets.sh
# Debian's riscv64 kernel and a riscv64 busybox initramfs, for tests/riscv_guest.rs.
scripts/riscv-assets.sh
# Debian bookworm with systemd (debootstrap), for tests/debian_guest.rs; cached like the
# guest assets and rebuilt only when the script changes.
scripts/debian-rootfs.sh
# A Debian cloud-style disk image (GPT, GRUB, cloud-init), for tests/cloud_image.rs.
scripts/cloud-image.sh
status=0
cargo test --workspace --all-targets --no-fail-fast || status=$?
# Every fuzz target for a bounded time on stable Rust (crates/fuzzing; about 2 minutes in
# all): a panic fails the run and leaves its input in target/fuzz-artifacts.
cargo run -q -p fuzzing --bin fuzz-run -- --seconds "${VESSEL_FUZZ_SECONDS:-20}" all || status=$?
exit $status
