#!/usr/bin/env bash
# A cloud image booted the way cloud users boot one, Vessel beside QEMU: the Debian
# bookworm cloud-style image (scripts/cloud-image.sh) with a NoCloud seed, through
# SeaBIOS and the image's GRUB to Debian's kernel, systemd and cloud-init, on Vessel's
# emu accelerator and on QEMU q35 with TCG (its SeaBIOS), 1 GiB, one vCPU. Runs are
# interleaved (Vessel, QEMU, Vessel, ...); prints medians and Vessel / QEMU.
#
#   bench/image-boot.sh [RUNS]                   (default 3)
#   bench/image-boot.sh --firmware ovmf [RUNS]   UEFI: Debian's OVMF on both (QEMU with
#                                                its two pflash drives, code and a fresh
#                                                copy of the variable template each boot),
#                                                through the image's EFI GRUB
#
# Rows, timed on the host from the VMM's start: the kernel's first line ("Linux
# version"), cloud-init's runcmd done (a token the user-data prints on ttyS0), the
# serial getty's `login:` prompt, and "ssh ready": the first `ssh debian@GUEST true`
# that succeeds with the key the user-data installed. Both VMs get the same seed file
# (made here with mkfs.vfat and mtools, label cidata: byte for byte what each VM reads)
# as a read-only virtio disk, a throwaway qcow2 overlay on the image, and a virtio-net
# NIC on a TAP (vtap0) inside a network namespace this script creates for that boot
# (the guest 10.0.2.15 by the seed's network-config, the host side 10.0.2.1): traffic
# stays in the namespace. Every VMM, ssh and namespace it starts is ended by PID or
# name however the script ends.
#
# Environment: IMAGE_BOOT_QEMU_CPU (default max), IMAGE_BOOT_MEM_MIB (default 1024),
# IMAGE_BOOT_KEEP_CONSOLE=DIR keeps each boot's console, every line prefixed with the host
# seconds from the VMM's start when it arrived (DIR/<vm>-<run>.log): the phases of the
# boot side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
FIRMWARE=seabios
if [ "${1:-}" = "--firmware" ]; then
    FIRMWARE="${2:?--firmware seabios|ovmf}"
    shift 2
fi
case "$FIRMWARE" in
    seabios) ;;
    ovmf) [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || {
            echo "bench/image-boot.sh: --firmware ovmf needs Debian's ovmf: apt-get install ovmf" >&2
            exit 1
        } ;;
    *) echo "bench/image-boot.sh: --firmware seabios|ovmf" >&2; exit 1 ;;
esac
RUNS="${1:-3}"
command -v qemu-system-x86_64 >/dev/null || {
    echo "bench/image-boot.sh: installing qemu-system-x86" >&2
    apt-get install -y -qq qemu-system-x86 >/dev/null
}
for tool in mkfs.vfat mcopy ssh ssh-keygen ip; do
    command -v "$tool" >/dev/null || {
        echo "bench/image-boot.sh: needs $tool: apt-get install dosfstools mtools openssh-client iproute2" >&2
        exit 1
    }
done
[ "$(id -u)" = 0 ] || { echo "bench/image-boot.sh: needs root (network namespaces, TAPs)" >&2; exit 1; }
scripts/cloud-image.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
cargo build -q --release -p vessel
VESSEL="${CARGO_TARGET_DIR:-$PWD/target}/release/vessel"

work="$(mktemp -d)"
NS_PREFIX="vessel-imgbench-$$"
cleanup() {
    # The Python driver ends its VMMs and ssh by PID; this catches what a kill of the
    # driver itself left behind: anything still running in our namespaces, then them.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N '' -C vessel-bench -f "$work/id_ed25519"
MAC=52:54:00:12:34:56
cat >"$work/user-data" <<EOF2
#cloud-config
ssh_authorized_keys:
  - $(cat "$work/id_ed25519.pub")
runcmd:
  - [sh, -c, 'echo "vessel-bench-cloud-init-done \$(hostname)" > /dev/ttyS0']
EOF2
printf 'instance-id: bench\nlocal-hostname: bench\n' >"$work/meta-data"
cat >"$work/network-config" <<EOF2
version: 2
ethernets:
  nic0:
    match:
      macaddress: "$MAC"
    addresses: [10.0.2.15/24]
EOF2
truncate -s 1M "$work/seed.img"
mkfs.vfat -n cidata "$work/seed.img" >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/seed.img" "$work/user-data" "$work/meta-data" \
    "$work/network-config" ::/

# The driver runs in the background so a signal to this script reaches it at once: it
# ends its VMM and ssh by PID and deletes its namespace, then `cleanup` runs.
python3 - "$RUNS" "$ASSETS/debian-bookworm-cloud.qcow2" "$VESSEL" "$work" "$NS_PREFIX" "$MAC" \
    "$FIRMWARE" <<'PY' &
import os, select, shutil, signal, statistics, subprocess, sys, time

runs, image, vessel, work, ns_prefix, mac, firmware = (
    int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6],
    sys.argv[7])
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
mem = os.environ.get("IMAGE_BOOT_MEM_MIB", "1024")
qcpu = os.environ.get("IMAGE_BOOT_QEMU_CPU", "max")
keep = os.environ.get("IMAGE_BOOT_KEEP_CONSOLE")
seed = f"{work}/seed.img"
key = f"{work}/id_ed25519"
MARKS = [("kernel", b"Linux version"), ("cloud-init runcmd", b"vessel-bench-cloud-init-done bench"),
         ("login:", b"bench login:")]
ROWS = [name for name, _ in MARKS] + ["ssh ready"]
LIMIT = 900

def overlay():
    ov = f"{work}/overlay.qcow2"
    if os.path.exists(ov):
        os.unlink(ov)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, ov],
                   check=True)
    return ov

def fresh_vars(vm):
    # Each boot starts from the template, as a new VM would.
    path = f"{work}/{vm}-vars.fd"
    shutil.copyfile(OVMF_VARS, path)
    return path

def vessel_argv():
    fw = []
    if firmware == "ovmf":
        fw = ["--firmware", "ovmf", "--firmware-vars", fresh_vars("vessel")]
    return [vessel, "run", "--accel", "emu", "--memory", f"{mem}M", "--cpus", "1",
            "--serial", "stdio", "--disk", f"{overlay()},format=qcow2", *fw,
            "--disk", f"{seed},format=raw,readonly", "--net", f"tap=vtap0,mac={mac}"]

def qemu_argv():
    fw = []
    if firmware == "ovmf":
        fw = ["-drive", f"if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on",
              "-drive", f"if=pflash,format=raw,unit=1,file={fresh_vars('qemu')}"]
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", qcpu, "-m", mem,
            "-smp", "1", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", *fw,
            "-drive", f"file={overlay()},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-netdev", "tap,id=n0,ifname=vtap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]

def ns_run(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0

def ssh_argv(ns):
    return ["ip", "netns", "exec", ns, "ssh", "-i", key, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "debian@10.0.2.15", "true"]

def stop(p):
    if p is not None and p.poll() is None:
        p.kill()
    if p is not None:
        p.wait()

def boot(vm, i, argv):
    ns = f"{ns_prefix}-{vm}-{i}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    ns_run(ns, "ip", "link", "set", "lo", "up")
    t0 = time.monotonic()
    # `ip netns exec` execs the VMM: p.pid is the VMM's.
    p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out, seen, tap_up, probe, next_probe = b"", {}, False, None, 0.0
    stamped, line_start = [], 0
    try:
        while len(seen) < len(ROWS):
            now = time.monotonic() - t0
            if now > LIMIT or p.poll() is not None:
                return None, out
            # The VMM creates vtap0 in the namespace: give the host side its address.
            if not tap_up and ns_run(ns, "ip", "link", "show", "vtap0"):
                tap_up = (ns_run(ns, "ip", "addr", "add", "10.0.2.1/24", "dev", "vtap0")
                          and ns_run(ns, "ip", "link", "set", "vtap0", "up"))
            if probe is not None and probe.poll() is not None:
                if probe.returncode == 0 and "ssh ready" not in seen:
                    seen["ssh ready"] = time.monotonic() - t0
                probe = None
            if tap_up and probe is None and "ssh ready" not in seen and now >= next_probe:
                probe = subprocess.Popen(ssh_argv(ns), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                next_probe = now + 1.0
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                out += chunk
                now = time.monotonic() - t0
                while (nl := out.find(b"\n", line_start)) >= 0:
                    stamped.append(b"%8.2f %s" % (now, out[line_start:nl + 1]))
                    line_start = nl + 1
                for name, needle in MARKS:
                    if name not in seen and needle in out:
                        seen[name] = now
    finally:
        stop(probe)
        stop(p)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        if keep:
            os.makedirs(keep, exist_ok=True)
            with open(f"{keep}/{vm}-{i + 1}.log", "wb") as f:
                f.write(b"".join(stamped) + out[line_start:])
    return seen, out

signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
vms = {"vessel-emu": vessel_argv, "qemu-q35-tcg": qemu_argv}
results = {vm: {name: [] for name in ROWS} for vm in vms}
for i in range(runs):
    for vm, argv in vms.items():
        seen, out = boot(vm, i, argv())
        if seen is None:
            tail = out[-3000:].decode(errors="replace")
            print(f"run {i + 1} {vm}: did not reach every mark; console tail:\n{tail}", flush=True)
            continue
        print(f"run {i + 1} {vm}: " + ", ".join(f"{k} {seen[k]:.2f} s" for k in ROWS),
              flush=True)
        for k, v in seen.items():
            results[vm][k].append(v)

print(f"\nmedians of {runs} (host seconds from VMM start; 1 vCPU, {mem} MiB, QEMU -cpu {qcpu}, "
      f"firmware {firmware})")
print(f"{'mark':<20} {'vessel-emu':>12} {'qemu-q35-tcg':>14} {'vessel/qemu':>12}")
for name in ROWS:
    v, q = results["vessel-emu"][name], results["qemu-q35-tcg"][name]
    mv = statistics.median(v) if v else float("nan")
    mq = statistics.median(q) if q else float("nan")
    print(f"{name:<20} {mv:>11.2f}s {mq:>13.2f}s {mv / mq:>11.2f}x")
PY
driver=$!
trap 'kill -TERM $driver 2>/dev/null; wait $driver; exit 143' INT TERM
wait $driver
