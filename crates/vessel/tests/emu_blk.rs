//! virtio-blk's data path with a real guest (Debian's kernel on the emu accelerator,
//! the busybox initramfs): EVENT_IDX negotiated, many O_DIRECT requests in flight at
//! random places on a raw disk on virtio-mmio and a qcow2 disk on virtio-pci, checked by
//! the guest, and a host-side write error (a full filesystem) reaching the guest as an
//! I/O error while the VMM carries on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::console::{Console, CMDLINE};
use common::*;

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);
/// The random write/verify pass over all disks.
const PASS: Duration = Duration::from_secs(300);

/// A sparse raw image of `mib` MiB.
fn raw_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

fn qcow2_image(path: &Path, mib: u64) {
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(path)
        .arg(format!("{mib}M"))
        .output()
        .expect("qemu-img is needed: apt-get install qemu-utils");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn boot(disks: &[String]) -> Console {
    let mut args = vec!["--cmdline", CMDLINE];
    for d in disks {
        args.extend_from_slice(&["--disk", d]);
    }
    let mut c = Console::boot(&args);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    c
}

/// Guest shell: four writers at once over four 4 MiB regions of `$DEV`, each with its
/// own request size, every block written once in a random order with O_DIRECT; block
/// `b` of region `j` gets the pattern's bytes at `(b * bs + j MiB) mod 4 MiB`, so each
/// region must read back as the pattern rotated by `j` MiB. Prints `BAD-<j>` for a region
/// that does not and `VERIFIED-<dev>` at the end.
fn write_verify_script(dev: &str) -> String {
    format!(
        "DEV=/dev/{dev}; \
         for j in 0 1 2 3; do ( bs=$((16384 << j)); n=$((4194304 / bs)); \
           for b in $(shuf -i 0-$((n - 1))); do \
             dd if=/tmp/pat of=$DEV bs=$bs count=1 skip=$(( (b + j * n / 4) % n )) \
               seek=$((j * n + b)) oflag=direct 2>/dev/null || echo WERR-$j-$b; \
           done ) & done; wait; \
         for j in 0 1 2 3; do \
           want=$( (dd if=/tmp/pat bs=1M skip=$j 2>/dev/null; \
                    dd if=/tmp/pat bs=1M count=$j 2>/dev/null) | md5sum | cut -d' ' -f1); \
           got=$(dd if=$DEV bs=1M skip=$((j * 4)) count=4 iflag=direct 2>/dev/null \
                 | md5sum | cut -d' ' -f1); \
           [ \"$want\" = \"$got\" ] || echo BAD-$j; \
         done; echo VERIFIED-''{dev}"
    )
}

/// Guest shell: four readers at once, each reading its 4 MiB region of `$DEV` (written
/// by [`write_verify_script`]) in 4 KiB O_DIRECT blocks in a random order, every block
/// compared with the pattern's; prints `RBAD-<j>-<b>` for a block that differs and
/// `READ-VERIFIED-<dev>` at the end. Reads from the host's page cache are served on the
/// vCPU itself, the others by the I/O thread, under moderated interrupts.
fn read_verify_script(dev: &str) -> String {
    format!(
        "DEV=/dev/{dev};          for j in 0 1 2 3; do (            for b in $(shuf -i 0-1023 | head -n 256); do              want=$(dd if=/tmp/pat bs=4096 count=1 skip=$(( (b + j * 256) % 1024 ))                     2>/dev/null | md5sum);              got=$(dd if=$DEV bs=4096 count=1 skip=$((j * 1024 + b)) iflag=direct                    2>/dev/null | md5sum);              [ \"$want\" = \"$got\" ] || echo RBAD-$j-$b;            done ) & done; wait; echo READ-VERIFIED-''{dev}"
    )
}

#[test]
fn random_o_direct_writes_in_flight_read_back_intact_on_raw_mmio_and_qcow2_pci() {
    let dir = TempDir::new("blk-verify");
    let raw = dir.path().join("disk.raw");
    let qcow = dir.path().join("disk.qcow2");
    raw_image(&raw, 32);
    // 4 KiB clusters: the scattered writes allocate clusters and L2 tables as they go.
    qcow2_image(&qcow, 32);
    // The qcow2 disk on virtio-pci: its notifies are ioevents that follow the BAR.
    let mut c = boot(&[
        format!("{},format=raw", raw.display()),
        format!("{},format=qcow2,transport=pci", qcow.display()),
    ]);
    // The features the driver accepted, one character per bit: it took EVENT_IDX (29).
    let features = c.run("cat /sys/block/vda/device/features", CMD);
    assert_eq!(
        features.trim().chars().nth(29),
        Some('1'),
        "VIRTIO_RING_F_EVENT_IDX not negotiated: {features}"
    );
    let pat = c.run(
        "dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null; md5sum /tmp/pat",
        CMD,
    );
    assert!(pat.contains("/tmp/pat"), "{pat}");
    for dev in ["vda", "vdb"] {
        let out = c.run(&write_verify_script(dev), PASS);
        assert!(out.ends_with(&format!("VERIFIED-{dev}")), "{out}");
        assert!(!out.contains("WERR-"), "a write failed on {dev}: {out}");
        assert!(!out.contains("BAD-"), "data differs on {dev}: {out}");
        let out = c.run(&read_verify_script(dev), PASS);
        assert!(out.ends_with(&format!("READ-VERIFIED-{dev}")), "{out}");
        assert!(!out.contains("RBAD-"), "a read differs on {dev}: {out}");
    }
    // Four O_DIRECT readers at once on the raw disk: their completions share
    // interrupts (moderation on the emu's chip), fewer than one per request. The
    // interrupt counts and the disk's completed reads before and after.
    let count = "d=$(basename $(readlink /sys/block/vda/device)); \
                 echo $(grep \" $d\\$\" /proc/interrupts | awk '{print $2}') \
                 $(awk '{print $1}' /sys/block/vda/stat)";
    let before = c.run(count, CMD);
    c.run(
        "for j in 0 1 2 3; do dd if=/dev/vda of=/dev/null bs=4096 count=2000 \
           skip=$((j * 2000)) iflag=direct 2>/dev/null & done; wait",
        PASS,
    );
    let after = c.run(count, CMD);
    let nums = |s: &str| -> Vec<u64> {
        s.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let (b, a) = (nums(&before), nums(&after));
    assert_eq!((b.len(), a.len()), (2, 2), "{before} / {after}");
    let (irqs, reads) = (a[0] - b[0], a[1] - b[1]);
    assert!(reads >= 8000, "{reads} reads");
    assert!(
        irqs * 10 < reads * 9,
        "{irqs} interrupts for {reads} requests at queue depth 4"
    );
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    // What the guest wrote is in the images, where it wrote it.
    let pat_on_disk = std::fs::read(&raw).unwrap();
    assert_eq!(pat_on_disk.len(), 32 << 20);
    let (r0, r1) = (
        &pat_on_disk[..1 << 20],
        &pat_on_disk[(4 << 20) + (3 << 20)..8 << 20],
    );
    assert_eq!(r0, r1, "region 1 is the pattern rotated by 1 MiB");
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Two CPUs writing and reading at once through their own queues of a raw disk (whose
/// requests run in parallel, without a lock of the disk's) and of a qcow2 disk (whose
/// allocations are serialised): every block lands where it was written. The guest runs
/// `tests/guest-src/blk-verify.c` on both disks at once: four threads per disk, two on
/// each CPU, each writing its own 4 MiB region in a random order with O_DIRECT and
/// reading it back.
#[test]
fn writes_from_two_cpus_through_two_queues_each_read_back_intact_on_raw_and_qcow2() {
    let dir = TempDir::new("blk-mq-verify");
    let raw = dir.path().join("disk.raw");
    let qcow = dir.path().join("disk.qcow2");
    raw_image(&raw, 16);
    qcow2_image(&qcow, 16);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-src/blk-verify.c");
    let initrd = initramfs_with_program(dir.path(), &src, "blk-verify", &["-pthread"]);
    let mut c = Console::boot(&[
        "--cmdline",
        CMDLINE,
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        "2",
        "--virtio-transport",
        "pci",
        "--disk",
        &format!("{},format=raw,queues=2", raw.display()),
        "--disk",
        &format!("{},format=qcow2,queues=2", qcow.display()),
    ]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    let queues = c.run(
        "ls /sys/block/vda/mq /sys/block/vdb/mq | grep -c '^[0-9]'",
        CMD,
    );
    assert_eq!(queues.trim(), "4", "two queues per disk: {queues}");
    let count = "grep -h req /proc/interrupts | awk '{print $2 + $3}' | tr '\\n' ' '";
    let before = c.run(count, CMD);
    // Both disks at once: each CPU has requests on both disks' queues in flight.
    let out = c.run(
        "/blk-verify /dev/vda 4 4 2 > /tmp/a 2>&1 & /blk-verify /dev/vdb 4 4 2 > /tmp/b 2>&1 & \
         wait; cat /tmp/a /tmp/b",
        PASS,
    );
    for dev in ["vda", "vdb"] {
        assert!(
            out.contains(&format!("VERIFIED /dev/{dev} 1920 1920")),
            "{out}"
        );
    }
    assert!(!out.contains("ERR-"), "a request failed: {out}");
    assert!(!out.contains("BAD-"), "data differs: {out}");
    // Each CPU's requests went through its own queue of each disk: all four queues
    // completed requests during the pass.
    let after = c.run(count, CMD);
    let nums = |s: &str| -> Vec<u64> {
        s.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let (b, a) = (nums(&before), nums(&after));
    assert_eq!((b.len(), a.len()), (4, 4), "{before} / {after}");
    for (q, (x, y)) in b.iter().zip(&a).enumerate() {
        assert!(y > x, "request queue {q} took no part: {before} / {after}");
    }
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// A tmpfs of `size` mounted on `at` for the life of the value.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(at: PathBuf, size: &str) -> TinyFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        TinyFs(at)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_host_filesystem_reaches_the_guest_as_an_io_error_and_the_vmm_lives() {
    let dir = TempDir::new("blk-full");
    let fs = TinyFs::mount(dir.path().join("tiny"), "1m");
    // 64 MiB the guest sees, 1 MiB the host can store.
    let img = fs.0.join("disk.raw");
    raw_image(&img, 64);
    let good = dir.path().join("good.raw");
    raw_image(&good, 8);
    let mut c = boot(&[
        format!("{},format=raw", img.display()),
        format!("{},format=raw", good.display()),
    ]);
    let out = c.run(
        "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct; echo RC=$?",
        CMD,
    );
    assert!(out.contains("RC=1"), "dd succeeded on a full disk: {out}");
    assert!(
        out.to_lowercase().contains("i/o error"),
        "the guest saw no I/O error: {out}"
    );
    // The device and the VMM carry on: the full disk still reads, the other still writes.
    let after = c.run(
        "dd if=/dev/vda of=/dev/null bs=64k count=4 iflag=direct 2>/dev/null && echo READ-OK; \
         dd if=/dev/urandom of=/dev/vdb bs=64k count=16 oflag=direct 2>/dev/null \
         && echo WRITE-OK",
        CMD,
    );
    assert!(after.contains("READ-OK"), "{after}");
    assert!(after.contains("WRITE-OK"), "{after}");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    drop(c);
    drop(fs);
}
