//! Paravirtual I/O with a real guest: Debian's kernel on the emu accelerator with its
//! root filesystem on virtio-blk (raw, and a qcow2 overlay over it), virtio-rng, the
//! virtio-console, and virtio-net on a TAP inside a network namespace the test creates.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::console::Console;
use common::*;

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);

fn root_cmdline() -> &'static str {
    "console=ttyS0 panic=-1 quiet vessel.root=/dev/vda"
}

/// A fresh busybox ext4 image (scripts/rootfs.sh) in `dir`.
fn rootfs(dir: &TempDir) -> PathBuf {
    let out = dir.path().join("rootfs.ext4");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rootfs.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg(&out)
        .arg("32")
        .status()
        .expect("bash");
    assert!(
        st.success(),
        "scripts/rootfs.sh failed (needs e2fsprogs' mkfs.ext4)"
    );
    out
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed: apt-get install qemu-utils")
}

/// Boot with `disk` as root, run `cmd`, power off; returns what `cmd` printed.
fn boot_and_run(disk_arg: &str, extra: &[&str], cmd: &str) -> String {
    let mut args = vec!["--cmdline", root_cmdline(), "--disk", disk_arg];
    args.extend_from_slice(extra);
    let mut c = Console::boot(&args);
    c.expect("vessel-rootfs:", BOOT);
    c.expect("# ", BOOT);
    let out = c.run(cmd, CMD);
    c.send("sync; poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    out
}

#[test]
fn a_file_written_on_a_virtio_blk_root_survives_a_reboot() {
    let dir = TempDir::new("rootblk");
    let img = rootfs(&dir);
    let disk = format!("{},format=raw", img.display());
    let token = format!("vessel-{}", std::process::id());
    let out = boot_and_run(
        &disk,
        &["--rng"],
        &format!(
            "echo {token} > /root/persist && sync && cat /sys/class/misc/hw_random/rng_current \
             && head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n' | wc -c"
        ),
    );
    // virtio-rng is the guest's hardware RNG and yields data (64 bytes = 128 hex digits).
    assert!(out.contains("virtio_rng"), "{out}");
    assert!(out.trim_end().ends_with("128"), "{out}");
    let back = boot_and_run(&disk, &[], "cat /root/persist");
    assert_eq!(back, token);
}

#[test]
fn a_qcow2_overlay_takes_the_writes_and_leaves_its_raw_base_alone() {
    let dir = TempDir::new("qcow2");
    let base = rootfs(&dir);
    let overlay = dir.path().join("overlay.qcow2");
    let o = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base_before = std::fs::read(&base).unwrap();
    let disk = format!("{},format=qcow2", overlay.display());
    boot_and_run(
        &disk,
        &[],
        "dd if=/dev/urandom of=/root/blob bs=1k count=512 2>/dev/null; md5sum /root/blob > /root/blob.md5; sync",
    );
    let check = qemu_img(&["check", overlay.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base image changed"
    );
    let verify = boot_and_run(&disk, &[], "md5sum -c /root/blob.md5");
    assert!(verify.contains("/root/blob: OK"), "{verify}");
}

#[test]
fn the_virtio_console_carries_guest_output_to_the_host() {
    let dir = TempDir::new("hvc");
    let log = dir.path().join("hvc0.log");
    let mut c = Console::boot(&[
        "--cmdline",
        "console=ttyS0 panic=-1 quiet",
        "--virtio-console",
        &format!("file:{}", log.display()),
    ]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    c.run("echo through-hvc0 > /dev/hvc0", CMD);
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    let got = std::fs::read_to_string(&log).unwrap();
    assert!(got.contains("through-hvc0"), "{got:?}");
}

/// Bytes each way in the network test: enough for many full-sized TSO frames.
const XFER: usize = 4 << 20;

/// Boots the guest from inside `ns` with `args` (whose `--net` names `tap`), waits for its
/// shell, and gives the host's end of the TAP the VMM made there 10.0.2.1/24.
fn boot_in_ns_with_tap(ns: &NetNs, tap: &str, args: &[&str]) -> Console {
    let mut vessel_in_ns = ns.exec();
    vessel_in_ns.arg(env!("CARGO_BIN_EXE_vessel"));
    let mut c = Console::boot_with(vessel_in_ns, args);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.0.2.1/24", "dev", tap],
        vec!["ip", "link", "set", tap, "up"],
    ] {
        let o = ns.exec().args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    c
}

#[test]
fn the_guest_pings_and_sends_files_both_ways_over_virtio_net_with_offloads() {
    let ns = NetNs::new("net");
    let busybox = assets().join("busybox");
    let dir = TempDir::new("netxfer");
    let received = dir.path().join("received");
    let mut c = boot_in_ns_with_tap(
        &ns,
        "vtap0",
        &[
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--net",
            "tap=vtap0,mac=52:54:00:12:34:56",
        ],
    );
    let mac = c.run("cat /sys/class/net/eth0/address", CMD);
    assert_eq!(mac, "52:54:00:12:34:56");
    c.run(
        "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up",
        CMD,
    );
    let ping = c.run("ping -c 2 -W 5 10.0.2.1", Duration::from_secs(60));
    assert!(ping.contains("2 packets received"), "{ping}");
    // The guest driver took the offloads: the feature bits it negotiated, as the guest
    // lists them (bit 0 first).
    let bits = c.run(
        "cat /sys/bus/virtio/drivers/virtio_net/virtio*/features",
        CMD,
    );
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (8, "GUEST_TSO6"),
        (11, "HOST_TSO4"),
        (12, "HOST_TSO6"),
        (15, "MRG_RXBUF"),
        (29, "RING_EVENT_IDX"),
        (32, "VERSION_1"),
    ] {
        assert_eq!(
            bits.as_bytes().get(bit),
            Some(&b'1'),
            "{name} not negotiated: {bits}"
        );
    }

    // A file from the guest to a listener in the namespace, byte for byte.
    let listener = ns
        .exec()
        .arg(&busybox)
        .args(["nc", "-l", "-p", "5000"])
        // busybox nc ends the connection when its own stdin ends: keep that open.
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&received).unwrap())
        .spawn()
        .unwrap();
    let mut listener = Guarded(listener);
    let _listener_stdin = listener.0.stdin.take();
    std::thread::sleep(Duration::from_millis(300));
    let sent = c.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/payload bs=64k count={} 2>/dev/null; \
             md5sum /tmp/payload | cut -d' ' -f1; nc 10.0.2.1 5000 < /tmp/payload",
            XFER / 65536
        ),
        Duration::from_secs(120),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while listener.0.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = std::fs::read(&received).unwrap();
    assert_eq!(got.len(), XFER, "received {} bytes", got.len());
    let md5 = Command::new("md5sum").arg(&received).output().unwrap();
    let host_sum = String::from_utf8_lossy(&md5.stdout);
    let guest_sum = sent.lines().next().unwrap_or_default().trim().to_string();
    assert!(
        host_sum.starts_with(&guest_sum),
        "{host_sum} vs {guest_sum}"
    );

    // And a file from the namespace to a listener in the guest.
    let outbound = dir.path().join("outbound");
    let mut data = vec![0u8; XFER];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&outbound, &data).unwrap();
    c.send("nc -l -p 5001 > /tmp/inbound &");
    std::thread::sleep(Duration::from_millis(500));
    let sender = ns
        .exec()
        .arg(&busybox)
        .args(["nc", "10.0.2.15", "5001"])
        .stdin(std::fs::File::open(&outbound).unwrap())
        .output()
        .unwrap();
    assert!(
        sender.status.success(),
        "nc to the guest: {}",
        String::from_utf8_lossy(&sender.stderr)
    );
    let md5 = Command::new("md5sum").arg(&outbound).output().unwrap();
    let host_sum = String::from_utf8_lossy(&md5.stdout).into_owned();
    let guest_sum = c.run(
        "wait; wc -c < /tmp/inbound; md5sum /tmp/inbound | cut -d' ' -f1",
        Duration::from_secs(60),
    );
    let mut lines = guest_sum.lines().map(str::trim);
    assert_eq!(lines.next(), Some(XFER.to_string().as_str()), "{guest_sum}");
    let guest_md5 = lines.next().unwrap_or_default();
    assert!(
        !guest_md5.is_empty() && host_sum.starts_with(guest_md5),
        "{host_sum} vs {guest_md5}"
    );

    // Request/response: the guest sends small messages one by one to an echo in the
    // namespace, each a frame of its own (those leave from the notifying vCPU), and
    // gets every byte back in order.
    let echo = ns
        .exec()
        .arg(&busybox)
        .args(["nc", "-l", "-p", "5002", "-e", "cat"])
        .spawn()
        .unwrap();
    let _echo = Guarded(echo);
    std::thread::sleep(Duration::from_millis(300));
    let echoed = c.run(
        "i=0; while [ $i -lt 300 ]; do echo \"request-$i-$((i * 7919))\"; i=$((i + 1)); \
         done > /tmp/requests; \
         (while read l; do echo \"$l\"; usleep 2000; done < /tmp/requests; sleep 1) \
         | nc 10.0.2.1 5002 > /tmp/responses; \
         wc -l < /tmp/responses; cmp /tmp/requests /tmp/responses && echo same",
        Duration::from_secs(120),
    );
    let mut lines = echoed.lines().map(str::trim);
    assert_eq!(lines.next(), Some("300"), "{echoed}");
    assert_eq!(lines.next(), Some("same"), "{echoed}");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

/// The interrupts of the guest's `/proc/interrupts` lines whose name ends with `name`
/// (MSI-X vectors are per queue: `virtio0-req.1`), summed over the CPUs.
fn interrupts(table: &str, name: &str) -> u64 {
    table
        .lines()
        .filter(|l| l.trim_end().ends_with(name))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Round trips in the interrupt count test.
const ROUND_TRIPS: usize = 400;

#[test]
fn a_request_response_round_trip_costs_the_guest_at_most_one_interrupt_each_way() {
    use std::io::{Read, Write};
    let ns = NetNs::new("rr");
    // virtio-pci: the receive and transmit queues interrupt on vectors of their own.
    let mut c = boot_in_ns_with_tap(
        &ns,
        "vtaprr",
        &[
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--virtio-transport",
            "pci",
            "--net",
            "tap=vtaprr",
        ],
    );
    c.run(
        "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up",
        CMD,
    );
    c.send("nc -l -p 5003 -e cat &");
    std::thread::sleep(Duration::from_millis(500));
    // The host's side: a thread inside the namespace connects to the guest's echo.
    let netns = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).unwrap();
    let mut s = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor this thread holds; it moves only this
        // thread into the namespace.
        let r = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let mut last = None;
        for _ in 0..50 {
            match std::net::TcpStream::connect("10.0.2.15:5003") {
                Ok(s) => return s,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no connection to the guest's echo: {last:?}");
    })
    .join()
    .unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(CMD)).unwrap();
    let mut exchange = |i: usize| {
        let msg = format!("{i:064}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = [0u8; 64];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back[..], msg.as_bytes(), "round trip {i}");
    };
    // Warm-up, then the counted round trips, one at a time.
    for i in 0..20 {
        exchange(i);
    }
    let before = c.run("cat /proc/interrupts", CMD);
    for i in 0..ROUND_TRIPS {
        exchange(i);
    }
    let after = c.run("cat /proc/interrupts", CMD);
    let per_trip = |name: &str| {
        (interrupts(&after, name) - interrupts(&before, name)) as f64 / ROUND_TRIPS as f64
    };
    let (rx, tx) = (per_trip("input.0"), per_trip("output.0"));
    // One receive interrupt per request and at most one transmit interrupt per
    // response (EVENT_IDX: the driver asks for each while it has one buffer out; a
    // device that signalled every ring update or frame part would exceed these).
    assert!(
        rx > 0.5 && rx <= 1.1,
        "receive interrupts per round trip: {rx}\n{after}"
    );
    assert!(
        tx <= 1.1,
        "transmit interrupts per round trip: {tx}\n{after}"
    );
    drop(s);
    c.run("wait", CMD);
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

#[test]
fn a_two_cpu_guest_uses_two_queues_of_a_disk_and_two_queue_pairs_of_an_interface() {
    let ns = NetNs::new("mq");
    let dir = TempDir::new("mq");
    let disk = dir.path().join("scratch.raw");
    std::fs::write(&disk, vec![0x5au8; 8 << 20]).unwrap();
    let disk_arg = format!("{},format=raw,queues=2", disk.display());
    // virtio-pci: one MSI-X vector per queue, so the guest's interrupt table shows
    // which queues carried requests.
    let mut c = boot_in_ns_with_tap(
        &ns,
        "vtapmq",
        &[
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--cpus",
            "2",
            "--virtio-transport",
            "pci",
            "--disk",
            &disk_arg,
            "--net",
            "tap=vtapmq,queues=2",
        ],
    );
    // The drivers negotiated multi-queue and made a queue per CPU.
    let hw = c.run("ls /sys/block/vda/mq; ls /sys/class/net/eth0/queues", CMD);
    for q in ["0", "1", "rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(hw.split_whitespace().any(|w| w == q), "no {q}: {hw}");
    }
    let bits = c.run("cat /sys/bus/virtio/devices/virtio*/features", CMD);
    let mut lines = bits.lines().map(str::trim);
    let (blk, net) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    assert_eq!(
        blk.as_bytes().get(12),
        Some(&b'1'),
        "VIRTIO_BLK_F_MQ: {bits}"
    );
    assert_eq!(net.as_bytes().get(17), Some(&b'1'), "CTRL_VQ: {bits}");
    assert_eq!(
        net.as_bytes().get(22),
        Some(&b'1'),
        "VIRTIO_NET_F_MQ: {bits}"
    );

    // Each CPU reads its own half of the disk and pings the host: the requests and
    // frames go out on that CPU's queues, and the answers come back on them.
    c.run(
        "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up",
        CMD,
    );
    let out = c.run(
        "for cpu in 0 1; do \
           taskset -c $cpu dd if=/dev/vda of=/dev/null bs=64k count=32 skip=$((cpu * 32)) \
             2>/dev/null; \
           taskset -c $cpu ping -c 3 -W 5 10.0.2.1 | grep -c 'bytes from'; \
         done; md5sum /dev/vda | cut -d' ' -f1",
        Duration::from_secs(90),
    );
    let mut lines = out.lines().map(str::trim);
    assert_eq!(lines.next(), Some("3"), "pings from CPU 0: {out}");
    assert_eq!(lines.next(), Some("3"), "pings from CPU 1: {out}");
    let host_md5 = Command::new("md5sum").arg(&disk).output().unwrap();
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    let guest_md5 = lines.next().unwrap_or_default();
    assert!(
        !guest_md5.is_empty() && host_md5.starts_with(guest_md5),
        "{host_md5} vs {guest_md5}"
    );
    let table = c.run("cat /proc/interrupts", CMD);
    for q in [
        "req.0", "req.1", "input.0", "input.1", "output.0", "output.1",
    ] {
        assert!(
            interrupts(&table, q) > 0,
            "no interrupt on queue {q}:\n{table}"
        );
    }
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

#[test]
fn host_and_guest_talk_over_vsock_both_ways() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    let dir = TempDir::new("vsock");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-src/vsock-test.c");
    let initrd = initramfs_with_program(dir.path(), &src, "vsock-test", &[]);
    let uds = dir.path().join("v.sock");
    // The guest's connections to host port 1234 land here.
    let host_listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let host_side = std::thread::spawn(move || {
        let (mut s, _) = host_listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"hi-guest").unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });

    let mut c = Console::boot(&[
        "--cmdline",
        "console=ttyS0 panic=-1 quiet",
        "--initrd",
        initrd.to_str().unwrap(),
        "--vsock",
        &format!("cid=3,uds={}", uds.display()),
    ]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);

    // Guest to host.
    let out = c.run("/vsock-test connect 1234 hello-host", CMD);
    assert!(out.contains("GUEST-GOT hi-guest"), "{out}");
    assert_eq!(host_side.join().unwrap(), "hello-host");

    // Host to guest, through CONNECT on the device's socket.
    c.send("/vsock-test listen 5000 &");
    c.expect("LISTENING 5000", CMD);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(CMD)).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    s.write_all(b"ping").unwrap();
    let mut reply = [0u8; 16];
    let n = r.read(&mut reply).unwrap();
    assert_eq!(&reply[..n], b"pong:ping");
    c.expect("GUEST-ACCEPTED ping", CMD);
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

/// `qemu-img check`: true when it reports no corruption (exit 0, or 3 for leaked
/// clusters only, which a crash between allocating a cluster and linking it leaves).
fn qemu_img_check_clean(image: &Path) -> (bool, String) {
    let o = qemu_img(&["check", image.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (matches!(o.status.code(), Some(0) | Some(3)), text)
}

#[test]
fn qcow2_images_stay_consistent_when_the_vmm_is_killed_mid_write() {
    let dir = TempDir::new("crash");
    let base = rootfs(&dir);
    let overlay = dir.path().join("overlay.qcow2");
    let plain = dir.path().join("plain.qcow2");
    for args in [
        vec![
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
        // Small clusters: every few writes allocate an L2 table or a refcount block.
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            plain.to_str().unwrap(),
            "2G",
        ],
    ] {
        let o = qemu_img(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let base_before = std::fs::read(&base).unwrap();
    let disks = [
        format!("{},format=qcow2", overlay.display()),
        format!("{},format=qcow2", plain.display()),
    ];
    let mut committed = String::new();
    // Two boots, killed at different points of the same endless writes; the second
    // boot starts from the first one's crashed images.
    for (round, writes, kill_after) in [
        (0, 30, Duration::from_millis(300)),
        (1, 12, Duration::from_millis(800)),
    ] {
        let mut c = Console::boot(&[
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
        ]);
        c.expect("vessel-init:", BOOT);
        c.expect("# ", BOOT);
        // ext4 replays its journal here after the first crash.
        let mounted = c.run("mount -t ext4 /dev/vda /mnt && echo MOUNTED", CMD);
        assert!(mounted.ends_with("MOUNTED"), "{mounted}");
        // What was synced before a crash is there after it, on both disks.
        let sums = c.run(
            &format!(
                "{}md5sum /mnt/committed | cut -d' ' -f1; \
                 dd if=/dev/vdb bs=64k count=16 2>/dev/null | md5sum | cut -d' ' -f1",
                if round == 0 {
                    "dd if=/dev/urandom of=/mnt/committed bs=64k count=16 conv=fsync \
                     2>/dev/null; dd if=/mnt/committed of=/dev/vdb bs=64k conv=fsync \
                     2>/dev/null; sync; "
                } else {
                    ""
                }
            ),
            Duration::from_secs(60),
        );
        let mut lines = sums.lines().map(str::trim);
        let (file_sum, disk_sum) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        assert_eq!(file_sum.len(), 32, "{sums}");
        assert_eq!(file_sum, disk_sum, "{sums}");
        if round == 0 {
            committed = file_sum.to_string();
        } else {
            assert_eq!(file_sum, committed, "synced data lost in the crash");
        }
        // Writers that never end, from a random chunk made once: files on the
        // overlay's ext4 (copy-on-write from the raw base), and 4 KiB writes scattered
        // over the plain disk (most allocate a cluster and an L2 table), each flushed.
        c.send(&format!(
            "dd if=/dev/urandom of=/tmp/chunk bs=64k count=4 2>/dev/null; \
             (i=0; while :; do dd if=/tmp/chunk of=/mnt/f$((i % 6)) bs=64k count=4 \
             conv=fsync 2>/dev/null; i=$((i+1)); done) & \
             (i={first}; while :; do dd if=/tmp/chunk of=/dev/vdb bs=4k count=1 \
             seek=$((256 + (i * 7919) % 520000)) conv=fsync 2>/dev/null; echo P-$i-; \
             i=$((i+1)); done) & echo WRITERS-''STARTED",
            // Each boot scatters its writes over new clusters.
            first = 1 + round * 100_000
        ));
        c.expect("WRITERS-STARTED", CMD);
        // Kill while both writers are going: a while after the scattered writer's
        // `writes`th flushed write.
        c.expect(
            &format!("P-{}-", round * 100_000 + writes),
            Duration::from_secs(60),
        );
        std::thread::sleep(kill_after);
        let st = Command::new("kill")
            .args(["-KILL", &c.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            c.wait_exit(CMD),
            None,
            "the VMM ended some other way than SIGKILL"
        );
        for image in [&overlay, &plain] {
            let (clean, report) = qemu_img_check_clean(image);
            eprintln!("round {round}, {}: {}", image.display(), report.trim());
            assert!(
                clean,
                "round {round}: {} is corrupt after the crash:\n{report}",
                image.display()
            );
        }
        assert!(
            std::fs::read(&base).unwrap() == base_before,
            "round {round}: the raw base changed"
        );
    }
}

/// Each thread of process `pid` by name: its CPU time in clock ticks (user + system) and
/// its wake-ups (voluntary and involuntary context switches).
fn thread_activity(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(dir.join("stat")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(n, _)| n.to_string())
            .unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.push((name, ticks, switches));
    }
    out
}

#[test]
fn the_io_threads_sleep_while_the_guest_is_idle() {
    let ns = NetNs::new("idle");
    let dir = TempDir::new("idle");
    let disk = dir.path().join("scratch.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let uds = dir.path().join("v.sock");
    let log = dir.path().join("hvc0.log");
    let mut c = boot_in_ns_with_tap(
        &ns,
        "vtapidle",
        &[
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--disk",
            &format!("{},format=raw", disk.display()),
            "--net",
            "tap=vtapidle",
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--virtio-console",
            &format!("file:{}", log.display()),
        ],
    );
    // Every device has had work, so each thread has run and gone back to waiting.
    c.run(
        "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up",
        CMD,
    );
    let out = c.run(
        "ping -c 1 -W 5 10.0.2.1 | grep -c 'bytes from'; \
         dd if=/dev/vda of=/dev/null bs=64k count=16 2>/dev/null; echo hi > /dev/hvc0; \
         sleep 2; echo SETTLED",
        Duration::from_secs(60),
    );
    assert!(out.ends_with("SETTLED"), "{out}");
    let io_thread = |name: &str| {
        name.starts_with("blk")
            || name.starts_with("net-")
            || ["vsock", "hvc", "rng", "console-in", "emu-irqfd"].contains(&name)
    };
    let before = thread_activity(c.pid());
    let names: Vec<&str> = before.iter().map(|(n, ..)| n.as_str()).collect();
    for want in ["blk0", "net-vtapidle", "vsock", "hvc", "console-in"] {
        assert!(names.contains(&want), "no {want} thread among {names:?}");
    }
    std::thread::sleep(Duration::from_secs(10));
    let after = thread_activity(c.pid());
    for (name, ticks, switches) in after.iter().filter(|(n, ..)| io_thread(n)) {
        let Some((_, t0, s0)) = before.iter().find(|(n, ..)| n == name) else {
            continue;
        };
        // A thread that woke on a timeout (a poll every few ms, the old 20 and 100 ms
        // waits) shows hundreds of wake-ups in 10 s; an idle guest's kernel may still
        // send a stray frame (an IPv6 or ARP probe), which costs the NIC's thread one.
        assert!(
            switches - s0 <= 4,
            "I/O thread {name} woke {} times in 10 s of an idle guest",
            switches - s0
        );
        assert_eq!(
            ticks - t0,
            0,
            "I/O thread {name} used CPU while the guest idled"
        );
    }
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}
