#!/usr/bin/env bash
# virtio-blk inside the guest: sequential throughput (busybox dd, 128 MiB, 1 MiB blocks)
# and 4 KiB random read/write IOPS with O_DIRECT at queue depth 1 and 4 (bench/iops.c,
# built static here and appended to the initramfs). Vessel emu (virtio-mmio, the default,
# and virtio-pci) vs QEMU 7.2 TCG (q35 with virtio-blk-pci, microvm with virtio-mmio),
# same kernel, initramfs and raw image, runs interleaved; prints medians and each Vessel
# column / the best QEMU column.
#
#   bench/io.sh [RUNS]        (default 3)
#   VESSEL=path/to/vessel bench/io.sh   measures that binary instead of building one
#   VESSEL_BEFORE=path/to/vessel ...    also measures that one, as "vessel-before" and
#                                       "vessel-pci-before"
#   IO_CONFIGS=vessel-emu,qemu-q35      only these columns
#   IO_CPUS=2                           guests with 2 vCPUs (default 1); virtio-pci disks
#                                       then get a request queue per vCPU on both VMMs
#   IO_FORMAT=qcow2                     the disk is a qcow2 image (64 KiB clusters), made
#                                       afresh before each boot, so every VMM allocates
#                                       the same clusters (in the sequential write; the
#                                       random I/O then runs on allocated clusters)
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
WORK="$(mktemp -d /tmp/vessel-io-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
FORMAT="${IO_FORMAT:-raw}"
IMG="$WORK/disk.$FORMAT"
case "$FORMAT" in
    raw) truncate -s 256M "$IMG" ;;
    qcow2) qemu-img create -q -f qcow2 "$IMG" 256M ;;
    *) echo "IO_FORMAT must be raw or qcow2" >&2; exit 2 ;;
esac
# The initramfs with /iops appended as a second cpio archive (the kernel unpacks both).
mkdir "$WORK/extra"
gcc -static -O2 -pthread -o "$WORK/extra/iops" bench/iops.c
( cd "$WORK/extra" && echo iops | cpio -o -H newc --quiet | gzip ) > "$WORK/iops.cpio.gz"
cat "$ASSETS/initramfs.cpio.gz" "$WORK/iops.cpio.gz" > "$WORK/initramfs.cpio.gz"

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$IMG" "$WORK/initramfs.cpio.gz" "${VESSEL_BEFORE:-}" "$FORMAT" <<'PY'
import os, re, select, statistics, subprocess, sys, time

runs, assets, vessel, img, initrd = int(sys.argv[1]), *sys.argv[2:6]
before, fmt = sys.argv[6], sys.argv[7]
cpus = os.environ.get("IO_CPUS", "1")
k = f"{assets}/vmlinuz"
cmdline = "console=ttyS0 panic=-1 quiet"

def vessel_argv(binary, transport="mmio"):
    return [binary, "run", "--accel", "emu", "--memory", "256M", "--cpus", cpus,
            "--kernel", k, "--initrd", initrd, "--cmdline", cmdline,
            "--disk", f"{img},format={fmt}", "--virtio-transport", transport]

configs = {"vessel-emu": vessel_argv(vessel), "vessel-pci": vessel_argv(vessel, "pci")}
if before:
    configs["vessel-before"] = vessel_argv(before)
    configs["vessel-pci-before"] = vessel_argv(before, "pci")
configs["qemu-q35"] = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
                       "-smp", cpus,
                       "-nographic", "-no-reboot", "-kernel", k, "-initrd", initrd,
                       "-append", cmdline, "-drive", f"file={img},if=virtio,format={fmt}"]
# microvm: virtio-mmio, no PCI; QEMU adds the devices to the kernel command line itself.
configs["qemu-microvm"] = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
                           "-smp", cpus,
                           "-nographic", "-no-reboot", "-kernel", f"{assets}/vmlinux",
                           "-initrd", initrd, "-append", cmdline,
                           "-drive", f"file={img},if=none,id=d0,format={fmt}",
                           "-device", "virtio-blk-device,drive=d0"]
only = [c for c in os.environ.get("IO_CONFIGS", "").split(",") if c]
if only:
    configs = {n: a for n, a in configs.items() if n in only}
# 4 KiB random I/O: (label, mode, threads = queue depth), 4 s each over the first 128 MiB.
IOPS = [("randwrite-qd1", "w", 1), ("randread-qd1", "r", 1),
        ("randwrite-qd4", "w", 4), ("randread-qd4", "r", 4)]
# busybox dd prints no rate and its date has no nanoseconds: bracket each transfer with
# /proc/uptime (10 ms resolution) and compute the rate here.
SCRIPT = ("echo W0=$(cut -d' ' -f1 /proc/uptime); "
          "dd if=/dev/zero of=/dev/vda bs=1M count=128 conv=fsync 2>/dev/null; "
          "echo W1=$(cut -d' ' -f1 /proc/uptime); echo 3 > /proc/sys/vm/drop_caches; "
          "echo R0=$(cut -d' ' -f1 /proc/uptime); "
          "dd if=/dev/vda of=/dev/null bs=1M count=128 2>/dev/null; "
          "echo R1=$(cut -d' ' -f1 /proc/uptime); "
          + "".join(f"echo {n}: $(/iops /dev/vda {m} 4 {t} 128); " for n, m, t in IOPS)
          + "echo IO-''DONE; poweroff -f\n")
MIB = 128

def mbps(buf, tag):
    t0 = re.search(tag + rb"0=([\d.]+)\r?\n", buf)
    t1 = re.search(tag + rb"1=([\d.]+)\r?\n", buf)
    if not (t0 and t1):
        return None
    secs = max(float(t1.group(1)) - float(t0.group(1)), 0.01)
    return MIB * 1048576 / 1e6 / secs

def one(argv, limit=300.0):
    if fmt == "qcow2":
        os.remove(img)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "256M"], check=True)
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
            # A boot that hangs (QEMU microvm now and then shows nothing at all) is a
            # failed run, not five wasted minutes.
            if not sent and time.monotonic() - start > 90:
                break
            # The typed line carries the marker quoted apart, so only dd's finish matches.
            if b"IO-DONE" in buf:
                break
        w, r = mbps(buf, b"W"), mbps(buf, b"R")
        iops = {}
        for n, _, _ in IOPS:
            m = re.search(n.encode() + rb": IOPS-[RW]=(\d+)", buf)
            if m:
                iops[n] = float(m.group(1))
        if w is None or r is None or len(iops) != len(IOPS):
            return None, None, None, buf[-800:].decode(errors="replace")
        return w, r, iops, None
    finally:
        p.kill(); p.wait()

cols = ["write MB/s", "read MB/s"] + [n for n, _, _ in IOPS]
res = {n: {c: [] for c in cols} for n in configs}
for i in range(runs):
    for name, argv in configs.items():
        w, r, iops, err = one(argv)
        if w is None:
            print(f"run {i+1} {name}: failed:\n{err!r}", file=sys.stderr)
            continue
        res[name]["write MB/s"].append(w); res[name]["read MB/s"].append(r)
        for n, v in iops.items():
            res[name][n].append(v)
        print(f"run {i+1} {name}: write {w:.1f} MB/s, read {r:.1f} MB/s, "
              + ", ".join(f"{n} {v:.0f} IOPS" for n, v in iops.items()), file=sys.stderr)

med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"\nvirtio-blk: sequential 128 MiB in 1 MiB blocks (MB/s); 4 KiB random O_DIRECT "
      f"(IOPS); {fmt} image; {cpus} vCPU(s); {runs} runs, medians")
print(f"{'config':<14}" + "".join(f"{c:>15}" for c in cols))
for n in configs:
    print(f"{n:<14}" + "".join(f"{med(res[n][c]):>15.1f}" for c in cols))
qemus = [n for n in configs if n.startswith("qemu") and res[n][cols[0]]]
# Higher is better in every column: the best QEMU is the highest median.
best = {c: max((med(res[n][c]) for n in qemus), default=float("nan")) for c in cols}
for n in configs:
    if n.startswith("qemu"):
        continue
    ratios = ", ".join(f"{c} {med(res[n][c]) / best[c]:.2f}x" for c in cols)
    print(f"{n} / best QEMU ({'/'.join(qemus)}): {ratios}")
PY
