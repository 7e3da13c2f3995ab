#!/usr/bin/env python3
"""The reference for Vessel's balloon figures (crates/vessel/tests/balloon.rs): QEMU's
virtio-balloon-pci under TCG with the same guest (the guest assets' kernel and initramfs,
256 MiB), which touches 160 MiB and frees it; then QMP `balloon` to 128 MiB and the
QEMU process's RSS before and after.

    VESSEL_ASSETS=DIR bench/balloon-qemu.py     # default ~/.cache/vessel/assets
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ASSETS = os.environ.get("VESSEL_ASSETS", os.path.expanduser("~/.cache/vessel/assets"))
SCRIPT = ("mkdir -p /t;mount -t tmpfs -o size=160m tmpfs /t;"
          "dd if=/dev/zero of=/t/f bs=1M count=160;rm /t/f;echo TOUCHED;sleep 600")


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    tmp = tempfile.mkdtemp(prefix="balloon-qemu-")
    qmp = os.path.join(tmp, "qmp.sock")
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256",
           "-nographic", "-nodefaults", "-serial", "stdio",
           "-kernel", os.path.join(ASSETS, "vmlinuz"),
           "-initrd", os.path.join(ASSETS, "initramfs.cpio.gz"),
           "-append", "console=ttyS0 panic=-1 quiet vessel.run=" + SCRIPT.replace(" ", "+"),
           "-device", "virtio-balloon-pci,id=balloon0,guest-stats-polling-interval=1",
           "-qmp", f"unix:{qmp},server=on,wait=off"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        out, t0 = b"", time.time()
        while b"TOUCHED" not in out:
            time.sleep(0.2)
            out += p.stdout.read() or b""
            if time.time() - t0 > 180:
                sys.exit("the guest never touched its memory:\n" + out.decode(errors="replace"))
        time.sleep(2)
        before = rss(p.pid)
        s = socket.socket(socket.AF_UNIX)
        s.connect(qmp)
        f = s.makefile("rw")
        f.readline()

        def q(command, args=None):
            msg = {"execute": command}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg) + "\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "return" in r or "error" in r:
                    return r

        q("qmp_capabilities")
        # QEMU's value is what the guest keeps: 128 MiB of 256 is a 128 MiB balloon.
        q("balloon", {"value": 128 << 20})
        for _ in range(120):
            actual = q("query-balloon")["return"]["actual"]
            if actual == 128 << 20:
                break
            time.sleep(0.5)
        time.sleep(1)
        after = rss(p.pid)
        print(f"QEMU TCG: guest keeps {actual >> 20} MiB, RSS {before} -> {after} KiB "
              f"(-{before - after} KiB)")
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    main()
