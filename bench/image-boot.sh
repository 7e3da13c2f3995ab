#!/usr/bin/env bash
# A cloud image booted the way cloud users boot one, Vessel beside QEMU: the Debian
# bookworm cloud-style image (scripts/cloud-image.sh) with a NoCloud seed, through
# SeaBIOS and the image's GRUB to Debian's kernel, systemd and cloud-init, on Vessel's
# emu accelerator and on QEMU q35 with TCG (its SeaBIOS), 1 GiB, one vCPU. Runs are
# interleaved (Vessel, QEMU, Vessel, ...); prints medians and Vessel / QEMU.
#
#   bench/image-boot.sh [RUNS]        (default 3)
#
# Rows, timed on the host from the VMM's start: the kernel's first line ("Linux
# version"), cloud-init's runcmd done (a token the user-data prints on ttyS0), and the
# serial getty's `login:` prompt. Both VMs get the same seed file (made here with
# mkfs.vfat and mtools, label cidata: byte for byte what each VM reads) as a read-only
# virtio disk, and a throwaway qcow2 overlay on the image. SSH is not measured (no
# network in this benchmark).
#
# Environment: IMAGE_BOOT_QEMU_CPU (default max), IMAGE_BOOT_MEM_MIB (default 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v qemu-system-x86_64 >/dev/null || {
    echo "bench/image-boot.sh: installing qemu-system-x86" >&2
    apt-get install -y -qq qemu-system-x86 >/dev/null
}
for tool in mkfs.vfat mcopy; do
    command -v "$tool" >/dev/null || {
        echo "bench/image-boot.sh: needs $tool: apt-get install dosfstools mtools" >&2
        exit 1
    }
done
scripts/cloud-image.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
cargo build -q --release -p vessel
VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/user-data" <<'EOF'
#cloud-config
runcmd:
  - [sh, -c, 'echo "vessel-bench-cloud-init-done $(hostname)" > /dev/ttyS0']
EOF
printf 'instance-id: bench\nlocal-hostname: bench\n' >"$work/meta-data"
truncate -s 1M "$work/seed.img"
mkfs.vfat -n cidata "$work/seed.img" >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/seed.img" "$work/user-data" "$work/meta-data" ::/

python3 - "$RUNS" "$ASSETS/debian-bookworm-cloud.qcow2" "$VESSEL" "$work" <<'PY'
import os, select, statistics, subprocess, sys, time

runs, image, vessel, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
mem = os.environ.get("IMAGE_BOOT_MEM_MIB", "1024")
qcpu = os.environ.get("IMAGE_BOOT_QEMU_CPU", "max")
seed = f"{work}/seed.img"
MARKS = [("kernel", b"Linux version"), ("cloud-init runcmd", b"vessel-bench-cloud-init-done bench"),
         ("login:", b"bench login:")]
LIMIT = 900

def overlay():
    ov = f"{work}/overlay.qcow2"
    if os.path.exists(ov):
        os.unlink(ov)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, ov],
                   check=True)
    return ov

def vessel_argv():
    return [vessel, "run", "--accel", "emu", "--memory", f"{mem}M", "--cpus", "1",
            "--serial", "stdio", "--disk", f"{overlay()},format=qcow2",
            "--disk", f"{seed},format=raw,readonly"]

def qemu_argv():
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", qcpu, "-m", mem,
            "-smp", "1", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot",
            "-drive", f"file={overlay()},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on"]

def boot(argv):
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    out, seen = b"", {}
    try:
        while len(seen) < len(MARKS):
            if time.monotonic() - t0 > LIMIT or p.poll() is not None:
                return None, out
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                out += chunk
                now = time.monotonic() - t0
                for name, needle in MARKS:
                    if name not in seen and needle in out:
                        seen[name] = now
    finally:
        p.kill()
        p.wait()
    return seen, out

vms = {"vessel-emu": vessel_argv, "qemu-q35-tcg": qemu_argv}
results = {vm: {name: [] for name, _ in MARKS} for vm in vms}
for i in range(runs):
    for vm, argv in vms.items():
        seen, out = boot(argv())
        if seen is None:
            tail = out[-3000:].decode(errors="replace")
            print(f"run {i + 1} {vm}: did not reach every mark; console tail:\n{tail}", flush=True)
            continue
        print(f"run {i + 1} {vm}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seen.items()),
              flush=True)
        for k, v in seen.items():
            results[vm][k].append(v)

print(f"\nmedians of {runs} (host seconds from VMM start; 1 vCPU, {mem} MiB, QEMU -cpu {qcpu})")
print(f"{'mark':<20} {'vessel-emu':>12} {'qemu-q35-tcg':>14} {'vessel/qemu':>12}")
for name, _ in MARKS:
    v, q = results["vessel-emu"][name], results["qemu-q35-tcg"][name]
    mv = statistics.median(v) if v else float("nan")
    mq = statistics.median(q) if q else float("nan")
    print(f"{name:<20} {mv:>11.2f}s {mq:>13.2f}s {mv / mq:>11.2f}x")
PY
