#!/usr/bin/env bash
# Real guest work: Debian bookworm with systemd (scripts/debian-rootfs.sh), booted on the
# guest assets' kernel and initramfs under Vessel's emu accelerator and QEMU TCG (microvm
# with virtio-mmio, q35 with virtio-pci), 512 MiB, one vCPU, the same image for each, plus
# the same commands on the host. Runs are interleaved (run 1 of every configuration, then
# run 2, ...); prints medians and Vessel / the best QEMU configuration.
#
#   bench/real.sh [RUNS]        (default 3)
#
# Rows: boot (VMM start to agetty's `login:` and to root's shell, timed on the host), and
# timed inside the guest with bash's $EPOCHREALTIME: a python3 loop (sum of i*i below 3M),
# sha256sum of 64 MiB, gzip of 32 MiB of text, 500 fork+exec of /bin/true, and
# `openssl speed -seconds 3 -bytes 16384 sha256` (its own MB/s). Every result is checked
# (exit status, and the sum, digest or figure it prints): a workload that fails in a guest
# is reported with its output and left out of the medians.
#
# Environment:
#   REAL_CONFIGS=vessel-emu,vessel-hybrid,qemu-microvm,qemu-q35,native   which columns
#                           to run (vessel-hybrid needs /dev/kvm: --accel hybrid)
#   REAL_VESSEL_CPU=MODEL   pass --cpu MODEL to Vessel (default: Vessel's default model)
#   REAL_QEMU_CPU=MODEL     QEMU's -cpu (default max: the most TCG implements)
#   REAL_CMDLINE=...        kernel command line for every VM alike
#   VESSEL_BASE_ACCEL=hybrid  runs vessel-base with that accelerator (default emu), and
#                           compares it with that column
#   VESSEL_BASE=PATH        adds a "vessel-base" column: another vessel binary (the build
#                           before a change), run interleaved with this one
#
# Each VM boots a throwaway overlay (a qcow2 for Vessel, -snapshot for QEMU): the image
# is never written.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v qemu-system-x86_64 >/dev/null || {
    echo "bench/real.sh: installing qemu-system-x86" >&2
    apt-get install -y -qq qemu-system-x86 >/dev/null
}
scripts/guest-assets.sh >/dev/null
scripts/debian-rootfs.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
cargo build -q --release -p vessel
VESSEL="$PWD/target/release/vessel"

python3 - "$RUNS" "$ASSETS" "$VESSEL" <<'PY'
import os, select, shutil, statistics, subprocess, sys, tempfile, time

runs, assets, vessel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
image = f"{assets}/debian-bookworm.ext4"
kbz, kelf, initrd = f"{assets}/vmlinuz", f"{assets}/vmlinux", f"{assets}/initramfs.cpio.gz"
cmdline = os.environ.get("REAL_CMDLINE", "console=ttyS0 vessel.root=/dev/vda quiet panic=-1")
qcpu = os.environ.get("REAL_QEMU_CPU", "max")
vcpu = os.environ.get("REAL_VESSEL_CPU", "")
MEM = 512
TEXT = "/var/lib/vessel-bench/text-32m.txt"
LOGIN = b"login: root (automatic login)"
PROMPT = b"root@vessel-debian:~# "
work = tempfile.mkdtemp(prefix="vessel-real-")

def vessel_argv(binary=vessel, accel="emu"):
    ov = f"{work}/overlay.qcow2"
    if os.path.exists(ov):
        os.unlink(ov)
    subprocess.run([vessel, "img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, ov],
                   check=True)
    argv = [binary, "run", "--accel", accel, "--memory", f"{MEM}M", "--cpus", "1",
            "--serial", "stdio", "--kernel", kbz, "--initrd", initrd, "--cmdline", cmdline,
            "--disk", f"{ov},format=qcow2"]
    return argv + (["--cpu", vcpu] if vcpu else [])

def qemu_argv(machine):
    kernel, dev = (kelf, "virtio-blk-device") if machine == "microvm" else (kbz, "virtio-blk-pci")
    return ["qemu-system-x86_64", "-M", machine, "-accel", "tcg", "-cpu", qcpu, "-m", str(MEM),
            "-smp", "1", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-drive", f"file={image},format=raw,if=none,id=root,snapshot=on",
            "-device", f"{dev},drive=root"]

vms = {
    "vessel-emu": vessel_argv,
    # Guest kernel on x86emu, guest user code natively on a KVM (PVM) vCPU (issue #21).
    "vessel-hybrid": lambda: vessel_argv(accel="hybrid"),
    "qemu-microvm": lambda: qemu_argv("microvm"),
    "qemu-q35": lambda: qemu_argv("q35"),
}
if os.environ.get("VESSEL_BASE"):
    base_accel = os.environ.get("VESSEL_BASE_ACCEL", "emu")
    vms["vessel-base"] = lambda: vessel_argv(os.environ["VESSEL_BASE"], accel=base_accel)
only = [c for c in os.environ.get("REAL_CONFIGS", "").split(",") if c]
known = list(vms) + ["native"]
if [c for c in only if c not in known]:
    sys.exit(f"bench/real.sh: unknown REAL_CONFIGS {only}; known: {known}")
columns = [c for c in known if not only or c in only]

N = 3_000_000
PY_SUM = str((N - 1) * N * (2 * N - 1) // 6)
ZERO64_SHA = "3b6a07d0d404fab4e23b6d34bc6696a6a312dd92821332385e5af7c01c421351"

def mbps(out):
    for line in out.splitlines():
        if line.startswith("+F:") and ":sha256:" in line:
            return float(line.rsplit(":", 1)[1]) / 1e6
    return None

# (key, label, shell command, check(output) -> value or None, unit). Time rows take the
# elapsed seconds; the openssl row takes its own figure.
WORK = [
    ("python", "python3 loop, sum of i*i to 3M",
     "python3 -c $'s=0\\nfor i in range(3000000):\\n    s+=i*i\\nprint(s)'",
     lambda out: out.strip() == PY_SUM, "s"),
    ("sha256", "sha256sum of 64 MiB",
     "head -c 64M /dev/zero | sha256sum",
     lambda out: out.split()[:1] == [ZERO64_SHA], "s"),
    ("gzip", "gzip of 32 MiB of text",
     f"gzip -c {TEXT} | wc -c",
     lambda out: out.strip().isdigit() and 0 < int(out.strip()) < 32 << 20, "s"),
    ("fork", "500 x fork+exec of /bin/true",
     "for i in $(seq 500); do /bin/true; done; echo ok",
     lambda out: out.strip() == "ok", "s"),
    ("openssl", "openssl speed sha256, 16 KiB blocks",
     "openssl speed -mr -seconds 3 -bytes 16384 sha256 2>/dev/null",
     lambda out: mbps(out) is not None, "MB/s"),
]

def timed(cmd):
    # Output kept in a file so the timing covers the work, not the console.
    return (f"s=$EPOCHREALTIME; {{ {cmd}; }} >/tmp/vb.out 2>&1; rc=$?; e=$EPOCHREALTIME; "
            f"echo \"@@R $rc $s $e\"; cat /tmp/vb.out")

def parse_timed(text):
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("@@R "):
            _, rc, s, e = line.split()
            return int(rc), float(e) - float(s), "\n".join(lines[i + 1:])
    return None, None, text

class VM:
    def __init__(self, argv):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf, self.mark = b"", 0

    def expect(self, needle, limit):
        deadline = time.monotonic() + limit
        while True:
            i = self.buf.find(needle, self.mark)
            if i >= 0:
                out = self.buf[self.mark:i]
                self.mark = i + len(needle)
                return out.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.buf += chunk

    def run(self, cmd, limit):
        self.p.stdin.write(f"echo '@@'B; {cmd}; echo '@@'E\n".encode())
        self.p.stdin.flush()
        if self.expect(b"@@B", limit) is None:
            return None
        out = self.expect(b"@@E", limit)
        return None if out is None else out.replace("\r", "").strip()

    def peak_rss_mib(self):
        try:
            for line in open(f"/proc/{self.p.pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def tail(self):
        return self.buf[-1500:].decode(errors="replace")

    def close(self):
        self.p.kill()
        self.p.wait()

results = {c: {} for c in columns}  # config -> row -> [values]
failures = {c: 0 for c in columns}
cpu_note = {}

def record(config, row, value):
    results[config].setdefault(row, []).append(value)

def guest_run(name, i):
    slow = name.startswith("vessel")
    # QEMU's microvm now and then hangs early in boot, silent (boot.sh's "hung" column):
    # that boot is counted and tried again, up to twice; Vessel gets no second try.
    for attempt in range(1 if slow else 3):
        vm = VM(vms[name]())
        if vm.expect(LOGIN, 300 if slow else 90) is not None:
            break
        failures[name] += 1
        print(f"run {i} {name}: never reached login:; last output:\n{vm.tail()}", file=sys.stderr)
        vm.close()
    else:
        return
    try:
        record(name, "login", time.monotonic() - vm.t0)
        if vm.expect(PROMPT, 120) is None:
            failures[name] += 1
            print(f"run {i} {name}: no root shell; last output:\n{vm.tail()}", file=sys.stderr)
            return
        record(name, "shell", time.monotonic() - vm.t0)
        # Untimed: boot has settled (no start jobs left), the corpus is in the page cache.
        settle = vm.run(f"systemctl is-system-running --wait; cat {TEXT} >/dev/null", 300)
        if settle is None:
            failures[name] += 1
            print(f"run {i} {name}: the shell stopped answering", file=sys.stderr)
            return
        if name not in cpu_note:
            lv = vm.run("/lib64/ld-linux-x86-64.so.2 --help | grep -o 'x86-64-v[0-9] (supported' "
                        "| head -n1 | cut -d' ' -f1; grep -m1 'model name' /proc/cpuinfo "
                        "| cut -d: -f2", 60) or ""
            cpu_note[name] = " / ".join(x.strip() for x in lv.splitlines() if x.strip()) or "?"
        line = [f"run {i} {name}: login {results[name]['login'][-1]:.2f} s"]
        for key, label, cmd, check, unit in WORK:
            text = vm.run(timed(cmd), 600 if slow else 300)
            if text is None:
                failures[name] += 1
                print(f"run {i} {name}: {label}: the guest stopped answering; last output:\n"
                      f"{vm.tail()}", file=sys.stderr)
                return
            rc, secs, out = parse_timed(text)
            if rc != 0 or not check(out):
                print(f"run {i} {name}: {label} FAILED (exit {rc}):\n{out[-800:]}", file=sys.stderr)
                continue
            value = mbps(out) if unit == "MB/s" else secs
            record(name, key, value)
            line.append(f"{key} {value:.2f}")
        rss = vm.peak_rss_mib()
        if rss:
            record(name, "rss", rss)
        print(", ".join(line), file=sys.stderr)
    finally:
        vm.close()

def native_run(i):
    text = f"{work}/text-32m.txt"
    if not os.path.exists(text):
        subprocess.run(["debugfs", "-R", f"dump {TEXT} {text}", image], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    line = [f"run {i} native:"]
    for key, label, cmd, check, unit in WORK:
        cmd = cmd.replace(TEXT, text)
        p = subprocess.run(["bash", "-c", timed(cmd).replace("/tmp/vb.out", f"{work}/vb.out")],
                           capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
        rc, secs, out = parse_timed(p.stdout)
        if rc != 0 or not check(out):
            print(f"run {i} native: {label} FAILED (exit {rc}):\n{out[-800:]}", file=sys.stderr)
            continue
        value = mbps(out) if unit == "MB/s" else secs
        record("native", key, value)
        line.append(f"{key} {value:.2f}")
    print(" ".join(line), file=sys.stderr)

try:
    for i in range(1, runs + 1):
        for name in columns:
            if name == "native":
                native_run(i)
            else:
                guest_run(name, i)
finally:
    shutil.rmtree(work, ignore_errors=True)

def med(config, row):
    xs = results[config].get(row, [])
    return statistics.median(xs) if xs else None

ROWS = [("login", "boot: start -> `login:`", "s"), ("shell", "boot: start -> root shell", "s")]
ROWS += [(k, label, unit) for k, label, _, _, unit in WORK]
ROWS.append(("rss", "peak RSS of the VMM", "MiB"))
qemus = [c for c in columns if c.startswith("qemu")]

kver = open(f"{assets}/kernel-version").read().strip()
print(f"\nDebian bookworm + systemd, kernel {kver}, {MEM} MiB, 1 vCPU; medians of {runs} runs")
print(f"cmdline {cmdline!r}; QEMU -cpu {qcpu}; Vessel --cpu {vcpu or '(default)'}")
for name, note in cpu_note.items():
    print(f"  {name}: guest ld.so level / CPU: {note}")
head = f"{'guest work':<38}" + "".join(f"{c:>14}" for c in columns)
if "vessel-emu" in columns and qemus:
    head += f"{'Vessel/QEMU best':>18}"
if "vessel-hybrid" in columns and qemus:
    head += f"{'hybrid/QEMU':>13}"
if "vessel-hybrid" in columns and "native" in columns:
    head += f"{'hybrid/native':>15}"
if "vessel-base" in columns:
    head += f"{'Vessel/base':>13}"
print(head)
for key, label, unit in ROWS:
    cells, vals = [], {}
    for c in columns:
        v = med(c, key)
        vals[c] = v
        if v is None:
            cells.append(f"{'—':>14}")
        elif unit == "MB/s":
            cells.append(f"{v:>9.0f} MB/s")
        elif unit == "MiB":
            cells.append(f"{v:>10.0f} MiB")
        else:
            cells.append(f"{v:>10.2f} s  ")
    row = f"{label:<38}" + "".join(cells)
    if "vessel-emu" in columns and qemus:
        v = vals.get("vessel-emu")
        qs = [vals[q] for q in qemus if vals.get(q)]
        if v and qs:
            # A time ratio throughout: above 1 means Vessel is slower (uses more memory).
            ratio = (max(qs) / v) if unit == "MB/s" else (v / min(qs))
            row += f"{ratio:>17.2f}x"
    if "vessel-hybrid" in columns and qemus:
        v = vals.get("vessel-hybrid")
        qs = [vals[q] for q in qemus if vals.get(q)]
        if v and qs:
            ratio = (max(qs) / v) if unit == "MB/s" else (v / min(qs))
            row += f"{ratio:>12.2f}x"
        else:
            row += f"{'—':>13}"
    if "vessel-hybrid" in columns and "native" in columns:
        v, n = vals.get("vessel-hybrid"), vals.get("native")
        if v and n:
            row += f"{(n / v) if unit == 'MB/s' else (v / n):>14.2f}x"
        else:
            row += f"{'—':>15}"
    v = vals.get("vessel-hybrid" if os.environ.get("VESSEL_BASE_ACCEL") == "hybrid"
                 else "vessel-emu")
    b = vals.get("vessel-base")
    if v and b:
        row += f"{(b / v) if unit == 'MB/s' else (v / b):>12.2f}x"
    print(row)
if any(failures.values()):
    print("failed boots or runs (QEMU boots retried): "
          + ", ".join(f"{c} {n}" for c, n in failures.items() if n))
PY
