#!/usr/bin/env bash
# riscv64 boot-to-init time and peak RSS: Vessel's RISC-V CPU (`vessel run --arch
# riscv64`) beside QEMU's `qemu-system-riscv64 -M virt` TCG, the same Debian riscv64
# kernel and busybox initramfs (scripts/riscv-assets.sh), the same firmware (Debian's
# OpenSBI fw_dynamic), 512 MiB, one hart. Runs are interleaved; prints medians and the
# Vessel/QEMU ratio of wall time and of CPU time (user + system of the process when
# /init speaks: steadier than wall time on a shared host). "Boot to init" ends when
# /init prints its first line on the UART.
#
#   bench/riscv.sh [RUNS]        (default 3)
#   VESSEL_BIN=path/to/vessel bench/riscv.sh   (time that binary instead of building one)
#   VESSEL_BASE=path/to/old/vessel bench/riscv.sh   (adds a "vessel-base" row: another
#       build, e.g. main's, timed in the same interleaved runs, so a change's effect is
#       read on the same host load; its ratio to QEMU is printed too)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v qemu-system-riscv64 >/dev/null || {
    echo "bench/riscv.sh: installing qemu-system-misc" >&2
    apt-get install -y -qq qemu-system-misc >/dev/null
}
FW=/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin
[ -s "$FW" ] || apt-get install -y -qq opensbi >/dev/null
scripts/riscv-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}/riscv64"
if [ -n "${VESSEL_BIN:-}" ]; then
    VESSEL="$VESSEL_BIN"
else
    cargo build -q --release -p vessel
    VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"
fi

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$FW" <<'PY'
import os, statistics, subprocess, sys, time, select

runs, assets, vessel, fw = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
k, initrd = f"{assets}/Image", f"{assets}/initramfs.cpio.gz"
cmdline = os.environ.get("BOOT_CMDLINE", "console=ttyS0")
MARK = b"vessel-init:"
def vessel_argv(binary):
    return [binary, "run", "--arch", "riscv64", "--memory", "512M", "--firmware", fw,
            "--kernel", k, "--initrd", initrd, "--cmdline", cmdline]

configs = {
    "vessel-riscv": vessel_argv(vessel),
    "qemu-virt": ["qemu-system-riscv64", "-M", "virt", "-accel", "tcg", "-m", "512",
                  "-smp", "1", "-nographic", "-no-reboot", "-bios", fw, "-kernel", k,
                  "-initrd", initrd, "-append", cmdline],
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

def cpu_s(pid):
    # user + system time of the whole process so far: on a shared host it moves far
    # less with the load than wall time does.
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")

def one(argv, limit):
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
                    return time.monotonic() - start, peak_rss_kib(p.pid), cpu_s(p.pid), None
        return None, peak_rss_kib(p.pid), None, buf[-400:].decode(errors="replace")
    finally:
        p.kill()
        p.wait()

results = {name: ([], [], []) for name in configs}
failures = {name: 0 for name in configs}
for i in range(runs):
    for name, argv in configs.items():
        t, rss, cpu, tail = one(argv, 300.0)
        if t is None:
            failures[name] += 1
            print(f"run {i+1} {name}: did not reach init; last output:\n{tail}", file=sys.stderr)
            continue
        results[name][0].append(t)
        results[name][1].append(rss)
        results[name][2].append(cpu)
        print(f"run {i+1} {name}: {t:.2f} s, cpu {cpu:.2f} s, peak RSS {rss/1024:.0f} MiB, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

def med(xs):
    return statistics.median(xs) if xs else float("nan")

kver = open(assets + "/kernel-version").read().strip()
print(f"\nriscv64 boot to init, {runs} runs each, medians (Debian {kver}, 512 MiB, 1 hart, cmdline {cmdline!r})")
print(f"{'config':<14} {'time (s)':>9} {'cpu (s)':>8} {'peak RSS (MiB)':>15} {'hung':>5}")
for name in configs:
    ts, rs, cs = results[name]
    print(f"{name:<14} {med(ts):>9.2f} {med(cs):>8.2f} {med(rs)/1024:>15.0f} {failures[name]:>5}")
v_t, q_t = med(results["vessel-riscv"][0]), med(results["qemu-virt"][0])
v_r, q_r = med(results["vessel-riscv"][1]), med(results["qemu-virt"][1])
v_c, q_c = med(results["vessel-riscv"][2]), med(results["qemu-virt"][2])
print(f"vessel-riscv / qemu-virt: time {v_t / q_t:.2f}x, cpu {v_c / q_c:.2f}x, peak RSS {v_r / q_r:.2f}x")
if "vessel-base" in configs:
    b_t, b_c = med(results["vessel-base"][0]), med(results["vessel-base"][2])
    print(f"vessel-base / qemu-virt: time {b_t / q_t:.2f}x, cpu {b_c / q_c:.2f}x; "
          f"vessel-riscv / vessel-base: time {v_t / b_t:.2f}x, cpu {v_c / b_c:.2f}x")
if any(not results[name][0] for name in configs):
    sys.exit("bench/riscv.sh: a configuration never reached init")
PY
