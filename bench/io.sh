#!/usr/bin/env bash
# Sequential virtio-blk throughput inside the guest (busybox dd, 128 MiB, 1 MiB blocks):
# Vessel emu vs QEMU 7.2 TCG (q35, virtio-blk-pci), same kernel, initramfs and raw image,
# runs interleaved; prints medians and Vessel/QEMU.
#
#   bench/io.sh [RUNS]        (default 3)
#   VESSEL=path/to/vessel bench/io.sh   measures that binary instead of building one
# Writes end with conv=fsync; reads follow a drop_caches, so both cross the device.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v qemu-system-x86_64 >/dev/null || apt-get install -y -qq qemu-system-x86 >/dev/null
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
if [ -z "${VESSEL:-}" ]; then
    cargo build -q --release -p vessel
    VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"
fi
IMG="$(mktemp /tmp/vessel-io-XXXXXX.raw)"
trap 'rm -f "$IMG"' EXIT
truncate -s 256M "$IMG"

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$IMG" <<'PY'
import os, re, select, statistics, subprocess, sys, time

runs, assets, vessel, img = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
k, initrd = f"{assets}/vmlinuz", f"{assets}/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet"
configs = {
    "vessel-emu": [vessel, "run", "--accel", "emu", "--memory", "256M", "--kernel", k,
                   "--initrd", initrd, "--cmdline", cmdline, "--disk", f"{img},format=raw"],
    "qemu-q35": ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
                 "-nographic", "-no-reboot", "-kernel", k, "-initrd", initrd,
                 "-append", cmdline, "-drive", f"file={img},if=virtio,format=raw"],
}
# busybox dd prints no rate and its date has no nanoseconds: bracket each transfer with
# /proc/uptime (10 ms resolution) and compute the rate here.
SCRIPT = ("echo W0=$(cut -d' ' -f1 /proc/uptime); "
          "dd if=/dev/zero of=/dev/vda bs=1M count=128 conv=fsync 2>/dev/null; "
          "echo W1=$(cut -d' ' -f1 /proc/uptime); echo 3 > /proc/sys/vm/drop_caches; "
          "echo R0=$(cut -d' ' -f1 /proc/uptime); "
          "dd if=/dev/vda of=/dev/null bs=1M count=128 2>/dev/null; "
          "echo R1=$(cut -d' ' -f1 /proc/uptime); echo IO-''DONE; poweroff -f\n")
MIB = 128

def mbps(buf, tag):
    t0 = re.search(tag + rb"0=([\d.]+)\r?\n", buf)
    t1 = re.search(tag + rb"1=([\d.]+)\r?\n", buf)
    if not (t0 and t1):
        return None
    secs = max(float(t1.group(1)) - float(t0.group(1)), 0.01)
    return MIB * 1048576 / 1e6 / secs

def one(argv, limit=300.0):
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    buf, start, sent = b"", time.monotonic(), False
    try:
        while time.monotonic() - start < limit:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                c = os.read(p.stdout.fileno(), 65536)
                if not c:
                    break
                buf += c
            if not sent and b"~ #" in buf:
                p.stdin.write(SCRIPT.encode()); p.stdin.flush(); sent = True
            # The typed line carries the marker quoted apart, so only dd's finish matches.
            if b"IO-DONE" in buf:
                break
        w, r = mbps(buf, b"W"), mbps(buf, b"R")
        if w is None or r is None:
            return None, None, buf[-500:].decode(errors="replace")
        return w, r, None
    finally:
        p.kill(); p.wait()

res = {n: ([], []) for n in configs}
for i in range(runs):
    for name, argv in configs.items():
        w, r, err = one(argv)
        if w is None:
            print(f"run {i+1} {name}: failed:\n{err}", file=sys.stderr)
            continue
        res[name][0].append(w); res[name][1].append(r)
        print(f"run {i+1} {name}: write {w:.1f} MB/s, read {r:.1f} MB/s", file=sys.stderr)

med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"\nvirtio-blk sequential, 128 MiB in 1 MiB blocks, {runs} runs, medians")
print(f"{'config':<12} {'write MB/s':>11} {'read MB/s':>10}")
for n in configs:
    print(f"{n:<12} {med(res[n][0]):>11.1f} {med(res[n][1]):>10.1f}")
v, q = res["vessel-emu"], res["qemu-q35"]
print(f"vessel-emu / qemu-q35: write {med(v[0])/med(q[0]):.2f}x, read {med(v[1])/med(q[1]):.2f}x")
PY
