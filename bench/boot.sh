#!/usr/bin/env bash
# Boot-to-init time and peak RSS: Vessel's emu accelerator vs QEMU TCG (q35 + SeaBIOS with
# the bzImage, and microvm with the PVH vmlinux), the same Debian kernel and busybox
# initramfs, 256 MiB, one vCPU. Runs are interleaved; prints medians and Vessel/QEMU.
#
#   bench/boot.sh [RUNS]        (default 5)
#
# BOOT_CONFIGS=vessel-emu (comma-separated names) runs only those configurations: with
# RUNS=100 that is the reliability run (the "hung" column counts boots that never reached
# init). BOOT_CMDLINE replaces the kernel command line for every configuration alike.
# VESSEL_BASE=PATH adds a "vessel-base" column: another vessel binary (the build before a
# change) booted the same way in the same interleaved run, printed as new/base.
# "Boot to init" ends when the guest's /init prints its first line on the serial console.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
command -v qemu-system-x86_64 >/dev/null || {
    echo "bench/boot.sh: installing qemu-system-x86" >&2
    apt-get install -y -qq qemu-system-x86 >/dev/null
}
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
cargo build -q --release -p vessel
VESSEL="$PWD/target/release/vessel"

python3 - "$RUNS" "$ASSETS" "$VESSEL" <<'PY'
import os, statistics, subprocess, sys, time, select, signal

runs, assets, vessel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
k, kelf, initrd = f"{assets}/vmlinuz", f"{assets}/vmlinux", f"{assets}/initramfs.cpio.gz"
cmdline = os.environ.get("BOOT_CMDLINE", "console=ttyS0 panic=-1")
MARK = b"vessel-init:"
def vessel_argv(binary):
    return [binary, "run", "--accel", "emu", "--memory", "256M", "--kernel", k,
            "--initrd", initrd, "--cmdline", cmdline]

configs = {
    "vessel-emu": vessel_argv(vessel),
    "qemu-q35": ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
                 "-nographic", "-no-reboot", "-kernel", k, "-initrd", initrd,
                 "-append", cmdline],
    "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
                     "-nographic", "-no-reboot", "-kernel", kelf, "-initrd", initrd,
                     "-append", cmdline],
}
if os.environ.get("VESSEL_BASE"):
    configs["vessel-base"] = vessel_argv(os.environ["VESSEL_BASE"])

def peak_rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def one(argv, limit=60.0):
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    buf = b""
    try:
        while time.monotonic() - start < limit:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                if MARK in buf:
                    t = time.monotonic() - start
                    return t, peak_rss_kib(p.pid), None
        return None, peak_rss_kib(p.pid), buf[-400:].decode(errors="replace")
    finally:
        p.kill()
        p.wait()

only = [c for c in os.environ.get("BOOT_CONFIGS", "").split(",") if c]
unknown = [c for c in only if c not in configs]
if unknown:
    sys.exit(f"bench/boot.sh: unknown BOOT_CONFIGS {unknown}; known: {list(configs)}")
if only:
    configs = {name: argv for name, argv in configs.items() if name in only}
results = {name: ([], []) for name in configs}
failures = {name: 0 for name in configs}
for i in range(runs):
    for name, argv in configs.items():
        # A QEMU boot that has not reached init in 30 s has hung (microvm's PIT-less
        # calibration); Vessel gets longer, being slower.
        t, rss, tail = one(argv, 90.0 if name.startswith("vessel") else 30.0)
        if t is None:
            failures[name] += 1
            print(f"run {i+1} {name}: did not reach init; last output:\n{tail}", file=sys.stderr)
            continue
        results[name][0].append(t)
        results[name][1].append(rss)
        print(f"run {i+1} {name}: {t:.2f} s, peak RSS {rss/1024:.0f} MiB", file=sys.stderr)

def med(xs):
    return statistics.median(xs) if xs else float("nan")

print(f"\nboot to init, {runs} runs each, medians (Debian {open(assets + '/kernel-version').read().strip()}, 256 MiB, 1 vCPU, cmdline {cmdline!r})")
print(f"{'config':<14} {'time (s)':>9} {'peak RSS (MiB)':>15} {'hung':>5}")
for name in configs:
    ts, rs = results[name]
    print(f"{name:<14} {med(ts):>9.2f} {med(rs)/1024:>15.0f} {failures[name]:>5}")
if "vessel-emu" not in results:
    sys.exit(0)
v_t, v_r = med(results["vessel-emu"][0]), med(results["vessel-emu"][1])
for ref in [r for r in ("qemu-q35", "qemu-microvm", "vessel-base") if r in results]:
    q_t, q_r = med(results[ref][0]), med(results[ref][1])
    print(f"vessel-emu / {ref}: time {v_t / q_t:.2f}x, peak RSS {v_r / q_r:.2f}x")
PY
