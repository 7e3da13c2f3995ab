#!/usr/bin/env bash
# virtio-net TCP throughput between a Vessel emu guest and the host, over a TAP inside a
# network namespace this script creates (and deletes): guest→host (busybox nc sending a
# file from the guest's tmpfs) and host→guest (busybox nc listening, output discarded),
# a Python socket on the host side, MIB MiB each way; times are taken on the host from
# the connection's start to its end. Also prints the VMM's CPU use and the TAP's frame
# counts (their average size shows whether segmentation offload is at work). Then
# request/response latency: the host sends 64 bytes to a busybox `nc -e cat` echo in the
# guest and waits for them back, RR_COUNT times (TCP_NODELAY), and reports the median and
# 99th percentile round trip, and the guest's virtio interrupts per round trip (from its
# /proc/interrupts, by queue where the transport has a vector per queue). The same runs with QEMU TCG (q35 with virtio-net-pci, and
# microvm with virtio-mmio, on the same TAP) as the reference, then Vessel / the best QEMU
# (for latency: the best QEMU's round trip / Vessel's, so above 1 is better here too);
# NET_CONFIGS=vessel-emu,qemu-q35 runs those columns only.
#
#   bench/net.sh [MIB] [RUNS]        (defaults 32 and 1; needs root for the namespace)
#                                    runs are interleaved: run 1 of each config, then 2...
#   VESSEL=path/to/vessel bench/net.sh   measures that binary instead of building one
#   VESSEL_BEFORE=path/to/vessel ...     also measures that one, as "vessel-before"
set -euo pipefail
cd "$(dirname "$0")/.."
MIB="${1:-32}"
RUNS="${2:-1}"
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
if [ -z "${VESSEL:-}" ]; then
    cargo build -q --release -p vessel
    VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"
fi
NS="vessel-netbench-$$"
ip netns add "$NS"
trap 'ip netns del "$NS"' EXIT

ip netns exec "$NS" python3 - "$MIB" "$RUNS" "$ASSETS" "$VESSEL" <<'PY'
import os, re, select, socket, statistics, subprocess, sys, threading, time

mib, runs, assets, vessel = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
TOTAL = mib << 20
TAP, HOST, GUEST = "vbench0", "10.0.2.1", "10.0.2.15"

CMDLINE = "console=ttyS0 panic=-1 quiet"
CONFIGS = {
    "vessel-emu": [vessel, "run", "--accel", "emu", "--memory", "256M", "--serial", "stdio",
                   "--kernel", f"{assets}/vmlinuz", "--initrd", f"{assets}/initramfs.cpio.gz",
                   "--cmdline", CMDLINE, "--net", f"tap={TAP}"],
    # The reference: QEMU TCG, q35, virtio-net-pci on a TAP of the same name (no vhost).
    "qemu-q35": ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
                 "-nographic", "-no-reboot", "-kernel", f"{assets}/vmlinuz",
                 "-initrd", f"{assets}/initramfs.cpio.gz", "-append", CMDLINE,
                 "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                 "-device", "virtio-net-pci,netdev=n0"],
    **({"vessel-before": [os.environ["VESSEL_BEFORE"], "run", "--accel", "emu", "--memory",
                          "256M", "--serial", "stdio", "--kernel", f"{assets}/vmlinuz",
                          "--initrd", f"{assets}/initramfs.cpio.gz", "--cmdline", CMDLINE,
                          "--net", f"tap={TAP}"]} if os.environ.get("VESSEL_BEFORE") else {}),
    "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
                     "-nographic", "-no-reboot", "-kernel", f"{assets}/vmlinux",
                     "-initrd", f"{assets}/initramfs.cpio.gz", "-append", CMDLINE,
                     "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                     "-device", "virtio-net-device,netdev=n0"],
}
RR_COUNT = int(os.environ.get("RR_COUNT", "1000"))

class Guest:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf, self.mark = b"", 0

    def expect(self, needle, limit=90.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            i = self.buf.find(needle, self.mark)
            if i >= 0:
                out = self.buf[self.mark:i]
                self.mark = i + len(needle)
                return out.decode(errors="replace")
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                c = os.read(self.p.stdout.fileno(), 65536)
                if not c:
                    break
                self.buf += c
        sys.exit(f"guest never printed {needle!r}:\n{self.buf[-800:].decode(errors='replace')}")

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n"); self.p.stdin.flush()

    def run(self, cmd, limit=180.0):
        self.send(f"echo '@@'B; {cmd}; echo '@@'E")
        self.expect(b"@@B", limit)
        return self.expect(b"@@E", limit).strip()

def cpu_secs(pid):
    """User+system CPU time of a process, all its threads."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def measured(fn, g):
    c0, t0 = cpu_secs(g.p.pid), time.monotonic()
    rate = fn(g)
    cpu = (cpu_secs(g.p.pid) - c0) / (time.monotonic() - t0)
    return rate, cpu

def guest_to_host(g):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, 5000)); srv.listen(1)
    res = {}
    def serve():
        c, _ = srv.accept(); t0 = time.monotonic(); n = 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        res["secs"], res["n"] = time.monotonic() - t0, n
        c.close()
    t = threading.Thread(target=serve); t.start()
    g.run(f"nc {HOST} 5000 < /tmp/zeros", 600)
    t.join(60); srv.close()
    assert res.get("n") == TOTAL, f"host received {res.get('n')} of {TOTAL} bytes"
    return TOTAL / 1e6 / res["secs"]

def host_to_guest(g):
    g.send("nc -l -p 5001 > /dev/null &")
    time.sleep(1.0)
    data = os.urandom(1 << 20)
    for _ in range(100):
        try:
            s = socket.create_connection((GUEST, 5001), timeout=5)
            break
        except OSError:
            time.sleep(0.2)
    t0 = time.monotonic()
    for _ in range(mib):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(600)
    while s.recv(65536):
        pass
    secs = time.monotonic() - t0
    s.close()
    g.run("wait")
    return TOTAL / 1e6 / secs

def virtio_irqs(g):
    """The guest's virtio interrupt counts so far, all CPUs, by /proc/interrupts name."""
    counts = {}
    for line in g.run("grep virtio /proc/interrupts").splitlines():
        f = line.split()
        n = 0
        for x in f[1:]:
            if not x.isdigit():
                break
            n += int(x)
        if len(f) > 1:
            counts[f[-1]] = counts.get(f[-1], 0) + n
    return counts

def request_response(g):
    """Round trips of 64 bytes to an echo in the guest: (median, 99th percentile) in µs,
    and the guest's virtio interrupts per round trip (by /proc/interrupts name)."""
    g.send("nc -l -p 5002 -e cat &")
    time.sleep(1.0)
    for _ in range(100):
        try:
            s = socket.create_connection((GUEST, 5002), timeout=5)
            break
        except OSError:
            time.sleep(0.2)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    msg, rtts = b"x" * 64, []
    for i in range(RR_COUNT + 20):
        if i == 20:
            irqs0 = virtio_irqs(g)
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            b = s.recv(4096)
            assert b, "the guest's echo closed the connection"
            got += len(b)
        if i >= 20:  # the first ones warm up both sides
            rtts.append((time.perf_counter() - t0) * 1e6)
    irqs1 = virtio_irqs(g)
    s.close()
    g.run("wait")
    rtts.sort()
    per_rt = {k: (v - irqs0.get(k, 0)) / RR_COUNT for k, v in irqs1.items()}
    return statistics.median(rtts), rtts[int(len(rtts) * 0.99)], per_rt

def bench(name, argv, i):
    g = Guest(argv)
    try:
        g.expect(b"~ #")
        for a in (["ip", "link", "set", "lo", "up"],
                  ["ip", "addr", "add", f"{HOST}/24", "dev", TAP],
                  ["ip", "link", "set", TAP, "up"]):
            subprocess.run(a, check=True)
        g.run(f"ip addr add {GUEST}/24 dev eth0 && ip link set eth0 up && "
              f"ping -c 1 -W 5 {HOST} >/dev/null")
        g.run(f"dd if=/dev/zero of=/tmp/zeros bs=64k count={TOTAL >> 16} 2>/dev/null")
        feats = g.run("cat /sys/bus/virtio/drivers/virtio_net/virtio*/features")
        print(f"{name}: virtio-net features the guest negotiated: {feats}", file=sys.stderr)
        (u, ucpu), (d, dcpu) = measured(guest_to_host, g), measured(host_to_guest, g)
        (r, r99, irq_rt), rcpu = measured(request_response, g)
        print(f"{name} run {i+1}: guest->host {u:.1f} MB/s (VMM {ucpu:.0%} of a core), "
              f"host->guest {d:.1f} MB/s (VMM {dcpu:.0%} of a core), "
              f"round trip {r:.0f} us (p99 {r99:.0f} us; VMM {rcpu:.0%} of a core)",
              file=sys.stderr)
        print(f"{name} run {i+1}: guest virtio interrupts per round trip "
              f"{sum(irq_rt.values()):.2f} ("
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(irq_rt.items()) if v)
              + ")", file=sys.stderr)
        st = [open(f"/sys/class/net/{TAP}/statistics/{k}").read().strip()
              for k in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")]
        print(f"{name} TAP: from the guest {st[0]} bytes in {st[1]} frames, to the guest "
              f"{st[2]} bytes in {st[3]} frames", file=sys.stderr)
        g.send("poweroff -f")
        g.p.wait(30)
        return u, d, r, r99, sum(irq_rt.values())
    finally:
        if g.p.poll() is None:
            g.p.kill(); g.p.wait()
        # The VMM's TAP goes with it; wait so the next guest can create it afresh.
        for _ in range(100):
            if not os.path.exists(f"/sys/class/net/{TAP}"):
                break
            time.sleep(0.05)

only = [c for c in os.environ.get("NET_CONFIGS", "").split(",") if c]
configs = {n: a for n, a in CONFIGS.items() if not only or n in only}
# Interleaved: run 1 of every configuration (each a fresh boot), then run 2, ...
runs_of = {n: [] for n in configs}
for i in range(runs):
    for name, argv in configs.items():
        try:
            runs_of[name].append(bench(name, argv, i))
        except (SystemExit, AssertionError, OSError) as e:
            # A boot that hangs (QEMU microvm now and then) is a failed run, not the end.
            print(f"{name} run {i+1}: failed: {e}", file=sys.stderr)
results = {n: tuple(statistics.median(r[k] for r in rs) for k in range(5))
           for n, rs in runs_of.items() if rs}
print(f"\nvirtio-net TCP, {mib} MiB each way (MB/s), {RR_COUNT} round trips of 64 bytes "
      f"(us), {runs} runs, medians")
print(f"{'config':<14} {'guest->host':>12} {'host->guest':>12} {'rtt median':>11} {'rtt p99':>9}"
      f" {'irqs/rtt':>9}")
for name, (u, d, r, r99, irq) in results.items():
    print(f"{name:<14} {u:>12.1f} {d:>12.1f} {r:>11.0f} {r99:>9.0f} {irq:>9.2f}")
qemus = [n for n in results if n.startswith("qemu")]
if qemus:
    bu = max(results[n][0] for n in qemus)
    bd = max(results[n][1] for n in qemus)
    br = min(results[n][2] for n in qemus)
    for name, (u, d, r, _, _) in results.items():
        if not name.startswith("qemu"):
            print(f"{name} / best QEMU ({'/'.join(qemus)}): guest->host {u / bu:.2f}x, "
                  f"host->guest {d / bd:.2f}x, round trip {br / r:.2f}x")
PY
