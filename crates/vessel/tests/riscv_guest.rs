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
