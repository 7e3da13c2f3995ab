#!/usr/bin/env bash
# SMP scaling: N parallel CPU-bound jobs (`head -c 64m /dev/zero | md5sum`) on N vCPUs, then
# SMP_FORKS (200) runs of /bin/true one after another (fork, exec, exit, wait) on the same,
# N = 1, 2, 4 (and 8 where the host has 8 cores), on Vessel's emu accelerator and on QEMU
# TCG with one host thread per vCPU (q35, `-accel tcg,thread=multi`), the same Debian kernel
# (bzImage) and busybox initramfs, 256 MiB. Runs are interleaved (run 1 of every N and VMM,
# then run 2, ...); prints medians of the jobs' wall time (guest clock, /proc/uptime around
# the jobs; the host's clock between the guest's two lines beside it), throughput relative
# to the same VMM's 1-vCPU run (N x T1 / TN: N means perfect scaling), boot time (VMM
# start to the initramfs' first line), and a cross-CPU round trip: two processes pinned
# to CPUs 0 and 1 (both to CPU 0 on 1 vCPU) pass a byte back and forth through pipes
# (bench/pingpong.c), so each round trip wakes a sleeping task on an idle vCPU twice.
# Then a real guest's boot per N: Debian bookworm with systemd (scripts/debian-rootfs.sh),
# 512 MiB, VMM start to agetty's autologin on the serial console, beside QEMU MTTCG
# (microvm, virtio-mmio disk: its fastest boot), and relative to the same VMM's 1 vCPU.
#
#   bench/smp.sh [RUNS]        (default 3)
#
# Environment:
#   SMP_NS=1,2,4        the vCPU counts (default 1,2,4, plus 8 with 8 host cores)
#   SMP_MB=64           MiB each job hashes
#   SMP_FORKS=200       how many /bin/true the fork+exec row runs
#   SMP_CONFIGS=vessel-emu,qemu-mttcg   which VMMs to run
#   SMP_VESSEL_CPU=MODEL   pass --cpu MODEL to Vessel (default: Vessel's default model)
#   VESSEL_BIN=path/to/vessel      measures that build (default: this tree's, built first)
#   VESSEL_BEFORE=path/to/vessel   also measures that build, as "vessel-before"
#   SMP_QEMU_CPU=MODEL     QEMU's -cpu (default max: the most TCG implements)
#   SMP_REAL=0             leaves out the Debian boot rows
#
# Every run checks that the guest saw N CPUs and that all N digests are right; a run that
# fails is reported with its output and left out of the medians. The host should be
# otherwise idle: other guests running beside the benchmark are named on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v gcc >/dev/null || {
    echo "bench/smp.sh: installing gcc" >&2
    apt-get install -y -qq gcc libc6-dev >/dev/null
}
command -v qemu-system-x86_64 >/dev/null || {
    echo "bench/smp.sh: installing qemu-system-x86" >&2
    apt-get install -y -qq qemu-system-x86 >/dev/null
}
scripts/guest-assets.sh >/dev/null
if [ "${SMP_REAL:-1}" != 0 ]; then
    scripts/debian-rootfs.sh >/dev/null
fi
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
if [ -z "${VESSEL_BIN:-}" ]; then
    cargo build -q --release -p vessel
fi
VESSEL="${VESSEL_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vessel}"

# The initramfs with /smp-bench appended as a second cpio archive: it starts one job per
# online CPU and prints the guest clock around them. /init runs it (vessel.run=) and
# powers off.
WORK="$(mktemp -d /tmp/vessel-smp-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/extra"
cat >"$WORK/extra/smp-bench" <<'SH'
#!/bin/sh
mb=${1:-64}
n=$(nproc)
echo "SMPBENCH-START cpus=$n"
a=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ $i -lt $n ]; do
    (head -c ${mb}m /dev/zero | md5sum >/tmp/md5.$i) &
    i=$((i + 1))
done
wait
b=$(cut -d' ' -f1 /proc/uptime)
sums=$(cut -d' ' -f1 /tmp/md5.* | sort | uniq -c | tr -s ' ' | tr '\n' ' ' | tr ' ' ':')
echo "SMPBENCH-RESULT cpus=$n start=$a end=$b sums=$sums"
# Then process start-up, one at a time: the guest puts each child on an idle CPU, so every
# fork and exit wakes another vCPU, and each vCPU runs the same code cold.
forks=${2:-200}
a=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ $i -lt $forks ]; do
    /bin/true
    i=$((i + 1))
done
b=$(cut -d' ' -f1 /proc/uptime)
echo "SMPBENCH-FORK forks=$forks start=$a end=$b"
other=0
[ "$n" -gt 1 ] && other=1
/pingpong 2000 0 $other
SH
chmod +x "$WORK/extra/smp-bench"
gcc -static -O2 -o "$WORK/extra/pingpong" bench/pingpong.c
(cd "$WORK/extra" && printf 'smp-bench\npingpong\n' | cpio -o -H newc --quiet | gzip) >"$WORK/extra.cpio.gz"
cat "$ASSETS/initramfs.cpio.gz" "$WORK/extra.cpio.gz" >"$WORK/initramfs-smp.cpio.gz"

# (This script's own processes, the command substitution's subshell included, are not others.)
others="$(pgrep -af 'qemu-system|vessel run|bench/' | grep -v -e 'bench/smp\.sh' -e pgrep || true)"
if [ -n "$others" ]; then
    echo "bench/smp.sh: other guests or benchmarks are running; figures will suffer:" >&2
    echo "$others" | cut -c1-160 >&2
fi

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$WORK/initramfs-smp.cpio.gz" "$WORK" <<'PY'
import hashlib, os, select, statistics, subprocess, sys, time

runs, assets, vessel, initrd = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
work = sys.argv[5]
kbz = f"{assets}/vmlinuz"
mb = int(os.environ.get("SMP_MB", "64"))
host_cores = os.cpu_count() or 1
ns = [int(x) for x in os.environ.get("SMP_NS", "").split(",") if x] or \
    [1, 2, 4] + ([8] if host_cores >= 8 else [])
qcpu = os.environ.get("SMP_QEMU_CPU", "max")
vcpu = os.environ.get("SMP_VESSEL_CPU", "")
forks = int(os.environ.get("SMP_FORKS", "200"))
cmdline = f"console=ttyS0 panic=-1 quiet vessel.run=/smp-bench+{mb}+{forks}"
want_md5 = hashlib.md5(bytes(mb << 20)).hexdigest()
MARK, START, RESULT = b"vessel-init:", b"SMPBENCH-START", b"SMPBENCH-RESULT"
FORK = b"SMPBENCH-FORK"
PINGPONG = b"PINGPONG"

def vessel_argv(n, binary=vessel):
    argv = [binary, "run", "--accel", "emu", "--cpus", str(n), "--memory", "256M",
            "--serial", "stdio", "--kernel", kbz, "--initrd", initrd, "--cmdline", cmdline]
    return argv + (["--cpu", vcpu] if vcpu else [])

def qemu_argv(n):
    return ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=multi", "-cpu", qcpu,
            "-smp", str(n), "-m", "256", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", kbz, "-initrd", initrd, "-append", cmdline]

# The real guest: the assets' kernel and initramfs switch to the image's root.
real = os.environ.get("SMP_REAL", "1") != "0"
image = f"{assets}/debian-bookworm.ext4"
real_cmdline = "console=ttyS0 vessel.root=/dev/vda quiet panic=-1"
LOGIN = b"login: root (automatic login)"

def vessel_real_argv(n, binary=vessel):
    # A throwaway overlay: the image is never written.
    ov = f"{work}/overlay.qcow2"
    if os.path.exists(ov):
        os.unlink(ov)
    subprocess.run([vessel, "img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, ov],
                   check=True)
    argv = [binary, "run", "--accel", "emu", "--cpus", str(n), "--memory", "512M",
            "--serial", "stdio", "--kernel", kbz, "--initrd", f"{assets}/initramfs.cpio.gz",
            "--cmdline", real_cmdline, "--disk", f"{ov},format=qcow2"]
    return argv + (["--cpu", vcpu] if vcpu else [])

def qemu_real_argv(n):
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg,thread=multi", "-cpu", qcpu,
            "-smp", str(n), "-m", "512", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", f"{assets}/vmlinux", "-initrd",
            f"{assets}/initramfs.cpio.gz", "-append", real_cmdline,
            "-drive", f"file={image},format=raw,if=none,id=root,snapshot=on",
            "-device", "virtio-blk-device,drive=root"]

vmms = {"vessel-emu": vessel_argv, "qemu-mttcg": qemu_argv}
real_vmms = {"vessel-emu": vessel_real_argv, "qemu-mttcg": qemu_real_argv}
if os.environ.get("VESSEL_BEFORE"):
    vmms["vessel-before"] = lambda n: vessel_argv(n, os.environ["VESSEL_BEFORE"])
    real_vmms["vessel-before"] = lambda n: vessel_real_argv(n, os.environ["VESSEL_BEFORE"])
only = [c for c in os.environ.get("SMP_CONFIGS", "").split(",") if c]
if [c for c in only if c not in vmms]:
    sys.exit(f"bench/smp.sh: unknown SMP_CONFIGS {only}; known: {list(vmms)}")
configs = [c for c in vmms if not only or c in only]

class Guest:
    def __init__(self, argv):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf = b""

    def expect(self, needle, limit):
        """Host seconds since start when `needle` had arrived (and the line it begins), or
        None after `limit` seconds or at EOF."""
        deadline = time.monotonic() + limit
        while True:
            i = self.buf.find(needle)
            if i >= 0 and b"\n" in self.buf[i:]:
                line = self.buf[i:].split(b"\n", 1)[0].decode(errors="replace").strip()
                return time.monotonic() - self.t0, line
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.buf += chunk

    def tail(self):
        return self.buf[-1500:].decode(errors="replace")

    def close(self):
        self.p.kill()
        self.p.wait()

results = {(c, n): {"jobs": [], "host": [], "boot": [], "fork": [], "rtt": [], "real": []}
           for c in configs for n in ns}
real_failures = {(c, n): 0 for c in configs for n in ns}
failures = {(c, n): 0 for c in configs for n in ns}

def one(config, n, i):
    def failed(why):
        failures[(config, n)] += 1
        print(f"run {i} {config} {n} vCPUs: {why}", file=sys.stderr)

    slow = config.startswith("vessel")
    # A QEMU boot that has not reached init in 90 s has hung: counted, tried again (twice).
    for attempt in range(1 if slow else 3):
        g = Guest(vmms[config](n))
        boot = g.expect(MARK, 300 if slow else 90)
        if boot is not None:
            break
        failed(f"never reached init; last output:\n{g.tail()}")
        g.close()
    else:
        return
    try:
        limit = 120 + 60 * n * mb / 16
        start = g.expect(START, 120)
        end = g.expect(RESULT, limit) if start else None
        if end is None:
            return failed(f"no result; last output:\n{g.tail()}")
        f = dict(kv.split("=", 1) for kv in end[1].split()[1:])
        sums = [s for s in f.get("sums", "").split(":") if s]
        ok_sums = sums == [str(n), want_md5]
        if f.get("cpus") != str(n) or not ok_sums:
            return failed(f"wrong result {end[1]!r} (want cpus={n}, {n} x {want_md5})")
        fork_line = g.expect(FORK, 60 + forks)
        if fork_line is None:
            return failed(f"no fork+exec result; last output:\n{g.tail()}")
        fk = dict(kv.split("=", 1) for kv in fork_line[1].split()[1:])
        fork_ms = (float(fk["end"]) - float(fk["start"])) * 1000 / forks
        pp_line = g.expect(PINGPONG, 60)
        if pp_line is None:
            return failed(f"no round-trip result; last output:\n{g.tail()}")
        rtt = float(dict(kv.split("=", 1) for kv in pp_line[1].split()[1:])["us"])
        jobs = float(f["end"]) - float(f["start"])
        host = end[0] - start[0]
        r = results[(config, n)]
        r["jobs"].append(jobs)
        r["host"].append(host)
        r["boot"].append(boot[0])
        r["fork"].append(fork_ms)
        r["rtt"].append(rtt)
        print(f"run {i} {config} {n} vCPUs: boot {boot[0]:.2f} s, jobs {jobs:.2f} s "
              f"(host {host:.2f} s), fork+exec {fork_ms:.2f} ms, round trip {rtt:.1f} us",
              file=sys.stderr)
    finally:
        g.close()

def one_real(config, n, i):
    g = Guest(real_vmms[config](n))
    try:
        login = g.expect(LOGIN, 300)
        if login is None:
            real_failures[(config, n)] += 1
            print(f"run {i} {config} {n} vCPUs: Debian never reached login; last output:\n"
                  f"{g.tail()}", file=sys.stderr)
            return
        results[(config, n)]["real"].append(login[0])
        print(f"run {i} {config} {n} vCPUs: Debian boot to login {login[0]:.2f} s",
              file=sys.stderr)
    finally:
        g.close()

for i in range(1, runs + 1):
    for n in ns:
        for config in configs:
            one(config, n, i)
            if real:
                one_real(config, n, i)

def med(xs):
    return statistics.median(xs) if xs else float("nan")

kver = open(f"{assets}/kernel-version").read().strip()
qver = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                      text=True).stdout.splitlines()[0]
print(f"\nN parallel `head -c {mb}m /dev/zero | md5sum` on N vCPUs, medians of {runs} runs; "
      f"host: {host_cores} cores; Debian {kver}, 256 MiB")
print(f"vessel-emu: cpu {vcpu or 'default'}; qemu-mttcg: {qver}, q35, "
      f"-accel tcg,thread=multi, -cpu {qcpu}")
print("jobs: wall time of the N jobs, guest clock (host clock beside it); "
      "throughput: N x T(1) / T(N), relative to the same VMM's 1 vCPU")
print(f"fork+exec: {forks} x /bin/true one after another, guest clock per run, and "
      "relative to the same VMM's 1 vCPU")
print("round trip: a pipe ping-pong between CPUs 0 and 1 (on 1 vCPU, within CPU 0), "
      "guest clock")
head = f"{'config':<11} {'vCPUs':>5} {'jobs (s)':>9} {'host (s)':>9} {'throughput':>11} " \
       f"{'boot (s)':>9} {'fork+exec (ms)':>15} {'round trip (us)':>16} {'failed':>7}"
print(head)
for config in configs:
    t1 = med(results[(config, 1)]["jobs"]) if (config, 1) in results else float("nan")
    f1 = med(results[(config, 1)]["fork"]) if (config, 1) in results else float("nan")
    for n in ns:
        r = results[(config, n)]
        tn = med(r["jobs"])
        rel = n * t1 / tn if r["jobs"] and t1 == t1 else float("nan")
        fn = med(r["fork"])
        fork = f"{fn:.2f} ({fn / f1:.2f}x)" if r["fork"] and f1 == f1 else "nan"
        print(f"{config:<11} {n:>5} {tn:>9.2f} {med(r['host']):>9.2f} {rel:>10.2f}x "
              f"{med(r['boot']):>9.2f} {fork:>15} {med(r['rtt']):>16.1f} "
              f"{failures[(config, n)]:>7}")
if real:
    print(f"\nDebian bookworm (systemd), 512 MiB: VMM start to the serial console's "
          f"autologin, medians of {runs} runs, and relative to the same VMM's 1 vCPU "
          f"(qemu-mttcg: microvm)")
    print(f"{'config':<13} {'vCPUs':>5} {'boot (s)':>9} {'vs 1 vCPU':>10} {'failed':>7}")
    for config in configs:
        b1 = med(results[(config, 1)]["real"]) if (config, 1) in results else float("nan")
        for n in ns:
            bn = med(results[(config, n)]["real"])
            print(f"{config:<13} {n:>5} {bn:>9.2f} {bn / b1:>9.2f}x "
                  f"{real_failures[(config, n)]:>7}")
if "vessel-emu" in configs and "qemu-mttcg" in configs:
    print("vessel-emu / qemu-mttcg, jobs time: " + ", ".join(
        f"{n} vCPU{'s' if n > 1 else ''} "
        f"{med(results[('vessel-emu', n)]['jobs']) / med(results[('qemu-mttcg', n)]['jobs']):.2f}x"
        for n in ns))
PY
