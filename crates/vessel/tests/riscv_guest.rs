//! riscv64 guests on Vessel's RISC-V CPU: Debian's riscv64 kernel boots through Debian's
//! OpenSBI to the busybox init of scripts/riscv-assets.sh, runs a command, reads and
//! writes a virtio-blk disk, and `poweroff -f` ends the VMM with status 0.

mod common;

use common::{run_with_timeout, vessel, TempDir};
use std::path::PathBuf;
use std::time::Duration;

/// The riscv64 assets; panics naming the setup step when they are missing.
fn riscv_assets() -> PathBuf {
    let dir = std::env::var_os("VESSEL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel/assets")
        })
        .join("riscv64");
    assert!(
        dir.join("Image").is_file() && dir.join("initramfs.cpio.gz").is_file(),
        "riscv64 guest assets missing in {}: run scripts/riscv-assets.sh",
        dir.display()
    );
    assert!(
        std::path::Path::new(vmm::riscv::DEFAULT_OPENSBI).is_file(),
        "{} missing: apt-get install opensbi",
        vmm::riscv::DEFAULT_OPENSBI
    );
    dir
}

const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn debian_riscv64_kernel_boots_to_busybox_and_powers_off() {
    let assets = riscv_assets();
    let out = run_with_timeout(
        vessel()
            .args(["run", "--arch", "riscv64", "--seccomp", "none", "--kernel"])
            .arg(assets.join("Image"))
            .arg("--initrd")
            .arg(assets.join("initramfs.cpio.gz"))
            .args([
                "--cmdline",
                "console=ttyS0 vessel.run=echo+rv-$((6*7));cat+/proc/cpuinfo",
            ]),
        LIMIT,
    );
    assert!(
        out.stdout.contains("OpenSBI v"),
        "OpenSBI did not start:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Linux version") && out.stdout.contains("riscv64"),
        "no kernel boot log:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("vessel-init: riscv64"),
        "init did not run:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("rv-42"),
        "the shell did not run the command:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("rv64imafdc"),
        "the guest did not see the ISA:\n{}",
        out.stdout
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "poweroff should end the VMM with 0; stderr:\n{}",
        out.stderr
    );
}

#[test]
fn virtio_blk_reads_and_writes_a_disk() {
    let assets = riscv_assets();
    let dir = TempDir::new("riscv-blk");
    let mut image = vec![0u8; 4 << 20];
    image[..16].copy_from_slice(b"vessel-rv-disk!\n");
    let disk = dir.file("disk.raw", &image);
    let out = run_with_timeout(
        vessel()
            .args(["run", "--arch", "riscv64", "--seccomp", "none", "--kernel"])
            .arg(assets.join("Image"))
            .arg("--initrd")
            .arg(assets.join("initramfs.cpio.gz"))
            .arg("--disk")
            .arg(&disk)
            .args(["--firmware", vmm::riscv::DEFAULT_OPENSBI])
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=head+-c+16+/dev/vda;echo+written-by-riscv|dd+of=/dev/vda+bs=4096+seek=1+conv=notrunc,fsync",
            ]),
        LIMIT,
    );
    assert!(
        out.stdout.contains("vessel-rv-disk!"),
        "the guest did not read the disk:\n{}",
        out.stdout
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(
        &after[4096..4096 + 18],
        b"written-by-riscv\n\0",
        "the guest's write did not reach the disk"
    );
}

/// A network namespace for one test, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Self {
        let name = format!("vessel-{tag}-{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) is needed");
        assert!(st.success(), "ip netns add failed (needs root)");
        NetNs(name)
    }

    fn ip(&self, args: &[&str]) -> bool {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "ip"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn virtio_net_pings_the_host_side_of_a_tap_and_virtio_rng_feeds_hwrng() {
    let assets = riscv_assets();
    let ns = NetNs::new("rvnet");
    // The VMM creates the TAP inside the namespace; give the host side its address as
    // soon as it appears, while the guest boots (the guest retries its ping meanwhile).
    let ns_name = ns.0.clone();
    let host_side = std::thread::spawn(move || {
        let ns = NetNs(ns_name);
        let deadline = std::time::Instant::now() + LIMIT;
        let mut configured = false;
        while std::time::Instant::now() < deadline {
            if ns.ip(&["link", "show", "rvtap0"]) {
                configured = ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "rvtap0"])
                    && ns.ip(&["link", "set", "rvtap0", "up"]);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Not ours to delete: the test's NetNs does.
        std::mem::forget(ns);
        configured
    });
    let out = run_with_timeout(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "--arch", "riscv64", "--seccomp", "none", "--kernel"])
            .arg(assets.join("Image"))
            .arg("--initrd")
            .arg(assets.join("initramfs.cpio.gz"))
            .args(["--net", "tap=rvtap0,mac=52:54:00:12:34:57", "--rng"])
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=cat+/sys/class/misc/hw_random/rng_current;\
                 head+-c+64+/dev/hwrng|wc+-c;\
                 ip+addr+add+10.0.2.15/24+dev+eth0;ip+link+set+eth0+up;\
                 for+i+in+$(seq+60);do+ping+-c1+-W2+10.0.2.1&&echo+ping-$((6*7))-ok&&break;sleep+1;done",
            ]),
        LIMIT,
    );
    assert!(
        host_side.join().unwrap(),
        "the VMM did not create rvtap0 in the namespace; stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("virtio_rng"),
        "the guest's hwrng is not virtio-rng:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.lines().any(|l| l.trim() == "64"),
        "the guest did not read 64 bytes from /dev/hwrng:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ping-42-ok"),
        "the guest did not ping the host side:\n{}",
        out.stdout
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
}
