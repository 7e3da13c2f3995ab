#!/usr/bin/env bash
# Cluster placement latency: three etcd members (Debian's etcd, data in /dev/shm) and
# three `vessel daemon --cluster` hosts on this machine; domains (defined, not started)
# are placed through the daemons in turn until 1,000 are defined. Prints the latency of
# one placement (a define through the API: placement read, filters and weigher, etcd
# transaction) at 100 and at 1,000 defined domains, and of `host-list` at both sizes.
# Each request is one HTTP exchange over the daemon's Unix socket (no CLI process).
# Then live migration across hosts: a Linux guest under emu (256 MiB, the busybox
# initramfs printing a counter) is migrated MIGRATIONS times between the hosts (placement
# picks the destination; the stream goes over TCP between the daemons), and the VMM's
# downtime and total time and the whole request's time are printed. Last, evacuation: the
# daemon of the guest's host is SIGKILLed and the time until the guest runs on another
# host is printed (the lease TTL, default 10 s, dominates it).
#
#   bench/cluster.sh [SAMPLES] [MIGRATIONS]   (defaults 20 placements measured at each
#                                 size, 5 migrations; VESSEL=path uses that binary
#                                 instead of a release build)
# Installs etcd-server and etcd-client if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES="${1:-20}"
MIGRATIONS="${2:-5}"
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "bench/cluster.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -z "${VESSEL:-}" ]; then
    cargo build -q --release -p vessel
    VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"
fi

ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
[ -f "$ASSETS/vmlinuz" ] && [ -f "$ASSETS/initramfs.cpio.gz" ] || scripts/guest-assets.sh >/dev/null

python3 - "$SAMPLES" "$VESSEL" "$MIGRATIONS" "$ASSETS" <<'PY'
import json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

samples, vessel, migrations, assets = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
work = tempfile.mkdtemp(prefix="vessel-cluster-bench-")
shm = tempfile.mkdtemp(prefix="vessel-cluster-bench-", dir="/dev/shm") if os.path.isdir("/dev/shm") else work
procs = []

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

def request(sock, method, path, body=None):
    """One HTTP exchange on the daemon's Unix socket: (status, JSON answer)."""
    data = json.dumps(body).encode() if body is not None else b""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    head = (f"{method} {path} HTTP/1.1\r\nHost: vessel\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    s.sendall(head.encode() + data)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, rest

try:
    ports = [(free_port(), free_port()) for _ in range(3)]
    initial = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    eps = ",".join(f"http://127.0.0.1:{c}" for c, _ in ports)
    for i, (c, p) in enumerate(ports):
        log = open(f"{work}/e{i}.log", "w")
        procs.append(subprocess.Popen([
            "etcd", "--name", f"e{i}", "--data-dir", f"{shm}/e{i}",
            "--listen-client-urls", f"http://127.0.0.1:{c}",
            "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", "100", "--election-timeout", "1000"],
            stdout=subprocess.DEVNULL, stderr=log))
    t0 = time.time()
    while subprocess.run(["etcdctl", "--endpoints", eps, "--command-timeout=2s", "put", "/probe", "1"],
                         env={**os.environ, "ETCDCTL_API": "3"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).returncode != 0:
        if time.time() - t0 > 30:
            sys.exit("etcd did not come up: see " + work)
        time.sleep(0.2)
    os.makedirs(f"{work}/shared")
    kernel = f"{work}/shared/kernel"
    open(kernel, "wb").write(b"\0" * 4096)
    socks = []
    open(f"{work}/token", "w").write("cluster-bench-token-0123456789\n")
    for i in range(3):
        d = f"{work}/h{i}"
        os.makedirs(d)
        sock = f"{d}/s.sock"
        log = open(f"{d}/daemon.log", "w")
        procs.append(subprocess.Popen([
            vessel, "daemon", "--socket", sock, "--state-dir", f"{d}/state",
            "--pool-root", f"{work}/shared", "--cluster", eps, "--host-name", f"h{i}",
            "--host-vcpus", "100000", "--host-memory-mib", "1000000",
            "--listen-tcp", f"127.0.0.1:{free_port()}", "--token-file", f"{work}/token"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "VESSEL_LOG": "warn"}))
        t0 = time.time()
        while not os.path.exists(sock):
            if time.time() - t0 > 20:
                sys.exit(f"daemon h{i} did not come up: see {d}/daemon.log")
            time.sleep(0.05)
        socks.append(sock)
    time.sleep(1)

    n = 0
    def define():
        global n
        body = {"name": f"d{n}", "driver": "vessel",
                "vm": {"kernel": kernel, "cmdline": "", "memory_mib": 16, "accel": "emu"}}
        t = time.perf_counter()
        status, rest = request(socks[n % 3], "POST", "/v1/domains", body)
        dt = time.perf_counter() - t
        if status != 201:
            sys.exit(f"define d{n}: HTTP {status}: {rest[:300]!r}")
        n += 1
        return dt

    def host_list():
        t = time.perf_counter()
        status, _ = request(socks[0], "GET", "/v1/cluster/hosts")
        assert status == 200
        return time.perf_counter() - t

    def ms(xs):
        xs = sorted(xs)
        p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
        return f"median {statistics.median(xs) * 1e3:7.2f} ms   p95 {p95 * 1e3:7.2f} ms"

    rows = []
    for size in (100, 1000):
        while n < size - samples:
            define()
        placed = [define() for _ in range(samples)]
        lists = [host_list() for _ in range(samples)]
        rows.append((size, placed, lists))
    print(f"Cluster placement, 3 etcd members + 3 hosts on one machine ({os.cpu_count()} CPUs), {vessel}")
    for size, placed, lists in rows:
        print(f"  {size:5d} defined domains: placement (define) {ms(placed)}   host-list {ms(lists)}")
    status, rest = request(socks[1], "GET", "/v1/cluster/hosts")
    hosts = json.loads(rest)
    print("  spread over hosts: " + ", ".join(
        f"{h['host']['name']}={h['used']['domains']}" for h in hosts), flush=True)

    if migrations > 0:
        counting = ("vessel.run=i=0;while+true;do+i=$((i-(-1)));echo+count+$i;"
                    "sleep+0.2;done")
        body = {"name": "mover", "driver": "vessel",
                "vm": {"kernel": f"{assets}/vmlinuz", "initrd": f"{assets}/initramfs.cpio.gz",
                       "cmdline": f"console=ttyS0 panic=-1 quiet {counting}",
                       "memory_mib": 256, "accel": "emu"}}
        status, rest = request(socks[0], "POST", "/v1/domains", body)
        assert status == 201, rest
        status, rest = request(socks[0], "POST", "/v1/domains/mover/start")
        assert status == 200, rest
        host = json.loads(rest)["host"]
        t0 = time.time()
        while True:
            _, log = request(socks[int(host[1:])], "GET", "/v1/domains/mover/log")
            if b"count 3\r" in log or b"count 3\n" in log:
                break
            if time.time() - t0 > 120:
                sys.exit(f"the migrating guest did not boot: {log[-500:]!r}")
            time.sleep(0.2)
        down, total, whole = [], [], []
        for k in range(migrations):
            t = time.perf_counter()
            status, rest = request(socks[k % 3], "POST", "/v1/domains/mover/migrate", {"live": True})
            dt = time.perf_counter() - t
            if status != 200:
                sys.exit(f"migration {k}: HTTP {status}: {rest[:400]!r}")
            r = json.loads(rest)
            down.append(r["downtime_ms"] / 1e3)
            total.append(r["total_ms"] / 1e3)
            whole.append(dt)
            time.sleep(1)
        print(f"  live migration across hosts (emu guest, 256 MiB, over TCP, {migrations} runs):")
        print(f"    downtime {ms(down)}   VMM total {ms(total)}   request {ms(whole)}", flush=True)

        # Evacuation: SIGKILL the daemon of the guest's host (its watchdog stops the VMM);
        # the guest runs again on another host once the host's lease has expired.
        status, rest = request(socks[0], "GET", "/v1/cluster/hosts")
        where = [h["host"]["name"] for h in json.loads(rest)
                 if any(d["name"] == "mover" and d["running"] for d in h["domains"])]
        dead = int(where[0][1:])
        other = socks[(dead + 1) % 3]
        daemon = procs[3 + dead]
        t = time.perf_counter()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        while True:
            status, rest = request(other, "GET", "/v1/cluster/hosts")
            if status == 200 and any(
                    h["host"]["name"] != f"h{dead}"
                    and any(d["name"] == "mover" and d["running"] for d in h["domains"])
                    for h in json.loads(rest)):
                break
            if time.perf_counter() - t > 60:
                sys.exit("the guest was not evacuated within 60 s")
            time.sleep(0.1)
        print(f"  evacuation (SIGKILL of its host's daemon until it runs elsewhere, lease TTL 10 s): "
              f"{time.perf_counter() - t:.1f} s")
finally:
    for p in reversed(procs):
        p.send_signal(signal.SIGKILL)
        p.wait()
    shutil.rmtree(work, ignore_errors=True)
    if shm != work:
        shutil.rmtree(shm, ignore_errors=True)
PY
