#!/usr/bin/env bash
# Live migration between two daemons over TCP, in clear and over mutual TLS (`vessel daemon
# --listen-tcp … --tls-cacert/--tls-cert/--tls-key`, `migrate --tls`), for the 512 MiB,
# one-vCPU emu guest of bench/snapshot.sh (Debian kernel, busybox initramfs) with its
# writer running (it copies a 32 MiB file in tmpfs over and over). Two pairs of daemons on
# loopback, one with certificates (scripts/tls-test-certs.sh) and one without; runs are
# interleaved; total and downtime are the source VMM's report (`migrate`'s answer).
#
#   bench/migrate-tls.sh [RUNS]        (default 3; medians printed)
#
# Each migration is checked: the guest's writer goes on at the destination.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
[ -n "${VESSEL_BIN:-}" ] || cargo build -q --release -p vessel
VESSEL="${VESSEL_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vessel}"
WORK=$(mktemp -d /tmp/vessel-migrate-tls.XXXXXX)
scripts/tls-test-certs.sh "$WORK/certs"

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$WORK" <<'PY'
import json, os, re, signal, socket, statistics, subprocess, sys, time

runs, assets, vessel, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
TOKEN = "bench-migration-token-0123456789"
open(f"{work}/token", "w").write(TOKEN + "\n")
certs = f"{work}/certs"
DAEMONS = []

def end_all(*_):
    for p, d in DAEMONS:
        # Their domains' VMMs first (by the PIDs the daemons recorded), then the daemons.
        for r, _, fs in os.walk(f"{d}/state/run"):
            if "vmm.pid" in fs:
                try:
                    os.kill(int(open(f"{r}/vmm.pid").read().split()[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        p.kill()
        p.wait()
    subprocess.run(["rm", "-rf", work])

import atexit
atexit.register(end_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

def free_addr():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    a = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    return a

def daemon(name, tls, leaf):
    d = f"{work}/{name}"
    os.makedirs(d)
    addr = free_addr()
    argv = [vessel, "daemon", "--socket", f"{d}/s.sock", "--state-dir", f"{d}/state",
            "--listen-tcp", addr, "--token-file", f"{work}/token"]
    if tls:
        argv += ["--tls-cacert", f"{certs}/ca.pem", "--tls-cert", f"{certs}/{leaf}.pem",
                 "--tls-key", f"{certs}/{leaf}.key"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(f"{d}/daemon.log", "w"), env=dict(os.environ, VESSEL_LOG="info"))
    DAEMONS.append((p, d))
    for _ in range(1000):
        if os.path.exists(f"{d}/s.sock"):
            break
        time.sleep(0.01)
    return {"sock": f"{d}/s.sock", "addr": addr}

def http(sock, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    resp = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        resp += b
    s.close()
    head, _, rest = resp.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest

WRITER = ("dd+if=/dev/urandom+of=/tmp/src+bs=1M+count=32;w=0;while+true;do+"
          "cp+/tmp/src+/tmp/dst;w=$((w-(-1)));echo+wrote+$w;done")

def wrote(d, name):
    st, body = http(d["sock"], "GET", f"/v1/domains/{name}/log")
    return [int(n) for n in re.findall(rb"wrote (\d+)", body)] if st == 200 else []

def wait_wrote(d, name, n, limit=180):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        w = wrote(d, name)
        if w and w[-1] >= n:
            return w
        time.sleep(0.2)
    raise SystemExit(f"bench/migrate-tls.sh: {name} never wrote {n} copies")

pairs = {
    "tcp":     (daemon("plain-a", False, None), daemon("plain-b", False, None)),
    "tcp+tls": (daemon("tls-a", True, "src"), daemon("tls-b", True, "dst")),
}
results = {k: [] for k in pairs}
for i in range(runs):
    for mode, (src, dst) in pairs.items():
        name = f"m{i}{mode.replace('+', '')}"
        vm = {"kernel": f"{assets}/vmlinuz", "initrd": f"{assets}/initramfs.cpio.gz",
              "cmdline": f"console=ttyS0 panic=-1 quiet vessel.run={WRITER}",
              "memory_mib": 512, "accel": "emu"}
        st, b = http(src["sock"], "POST", "/v1/domains", {"name": name, "driver": "vessel", "vm": vm})
        assert st // 100 == 2, b
        st, b = http(src["sock"], "POST", f"/v1/domains/{name}/start")
        assert st // 100 == 2, b
        wait_wrote(src, name, 6)
        st, b = http(src["sock"], "POST", f"/v1/domains/{name}/migrate",
                     {"dest": f"tcp://{dst['addr']}", "dest_token": TOKEN, "live": True,
                      "tls": mode == "tcp+tls", "undefine_source": True})
        assert st // 100 == 2, b
        rep = json.loads(b)
        wait_wrote(dst, name, 1, 60)
        r = {"total": rep["total_ms"], "downtime": rep["downtime_ms"], "rounds": rep["rounds"],
             "sent_mib": rep.get("bytes", 0) / 2**20}
        results[mode].append(r)
        print(f"run {i + 1} {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
        http(dst["sock"], "POST", f"/v1/domains/{name}/destroy")
        http(dst["sock"], "DELETE", f"/v1/domains/{name}")

cols = ["total", "downtime", "rounds", "sent_mib"]
print(f"\nlive migration between two daemons on loopback, 512 MiB emu guest, writer running, "
      f"medians of {runs} (ms; sent in MiB)")
print(f"{'':10}" + "".join(f"{c:>10}" for c in cols))
for mode, rs in results.items():
    print(f"{mode:10}" + "".join(f"{statistics.median(r[c] for r in rs):>10.1f}" for c in cols))
PY
