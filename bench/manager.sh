#!/usr/bin/env bash
# Manager latencies, Vessel vs libvirt, side by side: daemon cold start, define,
# start-to-guest-init, destroy, undefine, vol-create, vol-clone. Both drive the same QEMU
# (TCG, q35, 256 MiB, one vCPU) with the same Debian kernel and busybox initramfs; both
# are timed through their CLIs (vessel / virsh), so each number includes a client process.
# Runs are interleaved; prints medians and libvirt/Vessel ratios.
#
#   bench/manager.sh [RUNS]     (default 5; VESSEL=path uses that binary instead of a
#                                release build)
# Installs qemu-system-x86, libvirt-daemon-system and libvirt-clients if missing, and
# starts its own libvirtd (stopped again at the end if it started it).
#
# On a PVM host (module kvm_pvm) libvirt finds /dev/kvm, probes QEMU's KVM capabilities,
# and throws the cache away again on every define (30-50 s each here). As both sides run
# TCG domains anyway, libvirtd then starts in a mount namespace where /dev/kvm is
# /dev/null (HIDE_KVM=0 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
if [ ${#need[@]} -gt 0 ]; then
    echo "bench/manager.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
if [ -z "${VESSEL:-}" ]; then
    cargo build -q --release -p vessel
    VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"
fi

HIDE_KVM="${HIDE_KVM:-$([ -e /sys/module/kvm_pvm ] && echo 1 || echo 0)}"

python3 - "$RUNS" "$ASSETS" "$VESSEL" "$HIDE_KVM" <<'PY'
import os, shutil, signal, statistics, subprocess, sys, tempfile, time

runs, assets, vessel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
hide_kvm = sys.argv[4] == "1"
# QEMU under libvirt runs as libvirt-qemu: give both managers world-readable copies.
work = tempfile.mkdtemp(prefix="vessel-bench-", dir="/var/tmp")
os.chmod(work, 0o1777)
kernel, initrd = f"{work}/vmlinuz", f"{work}/initramfs.cpio.gz"
shutil.copy(f"{assets}/vmlinuz", kernel)
shutil.copy(f"{assets}/initramfs.cpio.gz", initrd)
for p in (kernel, initrd):
    os.chmod(p, 0o644)
cmdline = "console=ttyS0 panic=-1"
MARK = b"vessel-init:"
sock, state = f"{work}/vessel.sock", f"{work}/state"
pool_v, pool_l = f"{work}/pool-vessel", f"{work}/pool-libvirt"
for d in (pool_v, pool_l):
    os.mkdir(d)
    os.chmod(d, 0o777)

def run(*cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed: {r.stderr.decode().strip()}")
    return r.stdout

def timed(*cmd):
    t = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - t

def wait_for(path, mark, t0, limit=120):
    while time.perf_counter() - t0 < limit:
        try:
            with open(path, "rb") as f:
                if mark in f.read():
                    return time.perf_counter() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    sys.exit(f"bench: {mark!r} never appeared in {path}")

def wait_socket_cmd(cmd, t0, limit=60):
    while time.perf_counter() - t0 < limit:
        if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return time.perf_counter() - t0
        time.sleep(0.005)
    sys.exit(f"bench: {' '.join(cmd)} never succeeded")

V = [vessel, "--socket", sock]
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]

# --- daemons ---------------------------------------------------------------------
vd = None
def vessel_up():
    global vd
    t0 = time.perf_counter()
    vd = subprocess.Popen([vessel, "daemon", "--socket", sock, "--state-dir", state,
                           "--pool-root", pool_v],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_socket_cmd(V + ["list"], t0)
def vessel_down():
    vd.send_signal(signal.SIGKILL); vd.wait()

def libvirt_pids():
    out = subprocess.run(["pidof", "libvirtd"], stdout=subprocess.PIPE).stdout.split()
    return [int(p) for p in out]
started_libvirtd = not libvirt_pids()
def libvirt_up():
    t0 = time.perf_counter()
    if subprocess.run(["pidof", "virtlogd"], stdout=subprocess.DEVNULL).returncode != 0:
        run("virtlogd", "-d")
    if hide_kvm:
        run("unshare", "-m", "--propagation", "private", "sh", "-c",
            "mount --bind /dev/null /dev/kvm && exec libvirtd -d")
    else:
        run("libvirtd", "-d")
    return wait_socket_cmd(VIRSH + ["list"], t0)
def libvirt_down():
    for p in libvirt_pids():
        os.kill(p, signal.SIGTERM)
    while libvirt_pids():
        time.sleep(0.01)

res = {k: {"vessel": [], "libvirt": []} for k in
       ["daemon cold start", "define", "start -> guest init", "destroy", "undefine",
        "vol-create (qcow2 1G)", "vol-clone (full copy)", "vol-clone (qcow2 overlay)"]}
if not started_libvirtd:
    libvirt_down()
for i in range(min(runs, 3)):
    res["daemon cold start"]["vessel"].append(vessel_up())
    res["daemon cold start"]["libvirt"].append(libvirt_up())
    if i + 1 < min(runs, 3):
        vessel_down(); libvirt_down()

run(*V, "pool-define", "bench", pool_v)
run(*VIRSH, "pool-create-as", "vbench", "dir", "--target", pool_l)
run(*V, "vol-create", "bench", "base.qcow2", "1G")
run(*VIRSH, "vol-create-as", "vbench", "base.qcow2", "1G", "--format", "qcow2")

for i in range(runs):
    name = f"bench{i}"
    vlog = f"{state}/log/{name}.serial.log"
    llog = f"{work}/{name}.libvirt.serial.log"
    js = f"{work}/{name}.json"
    with open(js, "w") as f:
        f.write('{"name": "%s", "driver": "qemu", "vm": {"kernel": "%s", "initrd": "%s", '
                '"cmdline": "%s", "memory_mib": 256, "cpus": 1, "accel": "emu"}}'
                % (name, kernel, initrd, cmdline))
    xml = f"{work}/{name}.xml"
    with open(xml, "w") as f:
        f.write(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{llog}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    # Vessel
    res["define"]["vessel"].append(timed(*V, "define", js))
    t0 = time.perf_counter()
    run(*V, "start", name)
    res["start -> guest init"]["vessel"].append(wait_for(vlog, MARK, t0))
    res["destroy"]["vessel"].append(timed(*V, "destroy", name))
    res["undefine"]["vessel"].append(timed(*V, "undefine", name))
    res["vol-create (qcow2 1G)"]["vessel"].append(
        timed(*V, "vol-create", "bench", f"v{i}.qcow2", "1G"))
    res["vol-clone (full copy)"]["vessel"].append(
        timed(*V, "vol-clone", "bench", "base.qcow2", f"c{i}.qcow2", "--copy"))
    res["vol-clone (qcow2 overlay)"]["vessel"].append(
        timed(*V, "vol-clone", "bench", "base.qcow2", f"o{i}.qcow2"))
    # libvirt
    res["define"]["libvirt"].append(timed(*VIRSH, "define", xml))
    t0 = time.perf_counter()
    run(*VIRSH, "start", name)
    res["start -> guest init"]["libvirt"].append(wait_for(llog, MARK, t0))
    res["destroy"]["libvirt"].append(timed(*VIRSH, "destroy", name))
    res["undefine"]["libvirt"].append(timed(*VIRSH, "undefine", name))
    res["vol-create (qcow2 1G)"]["libvirt"].append(
        timed(*VIRSH, "vol-create-as", "vbench", f"v{i}.qcow2", "1G", "--format", "qcow2"))
    res["vol-clone (full copy)"]["libvirt"].append(
        timed(*VIRSH, "vol-clone", "base.qcow2", f"c{i}.qcow2", "--pool", "vbench"))
    # virsh has no overlay clone verb; vol-create-as with a backing volume is the equivalent.
    res["vol-clone (qcow2 overlay)"]["libvirt"].append(
        timed(*VIRSH, "vol-create-as", "vbench", f"o{i}.qcow2", "1G", "--format", "qcow2",
              "--backing-vol", "base.qcow2", "--backing-vol-format", "qcow2"))

run(*VIRSH, "pool-destroy", "vbench")
vessel_down()
if started_libvirtd:
    libvirt_down()
shutil.rmtree(work, ignore_errors=True)

def fmt(s):
    return f"{s * 1000:9.1f} ms" if s < 1 else f"{s:9.2f} s "
print(f"medians of {runs} runs ({min(runs, 3)} for cold starts); ratio = libvirt / Vessel")
if hide_kvm:
    print("(libvirtd ran with /dev/kvm hidden: see the note at the top of bench/manager.sh)")
print(f"{'operation':28} {'Vessel':>12} {'libvirt':>12} {'ratio':>7}")
for k, v in res.items():
    a, b = statistics.median(v["vessel"]), statistics.median(v["libvirt"])
    print(f"{k:28} {fmt(a):>12} {fmt(b):>12} {b / a:6.1f}x")
PY
