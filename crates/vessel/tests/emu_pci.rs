//! PCI with a real guest: Debian's kernel on the emu accelerator finds the host bridge
//! through ACPI (MCFG, `PCI0`), enumerates virtio-pci functions, drives them with MSI-X
//! vectors, and reads and writes a virtio-pci disk — beside a virtio-mmio disk, so both
//! transports share the machine.

mod common;

use std::time::Duration;

use common::console::{Console, CMDLINE};
use common::*;

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);

#[test]
fn virtio_pci_functions_enumerate_use_msix_and_carry_disk_io() {
    let dir = TempDir::new("pci");
    let pci_disk = dir.file("pci.raw", &vec![0u8; 4 << 20]);
    let mmio_disk = dir.file("mmio.raw", &vec![0u8; 4 << 20]);
    let mut c = Console::boot(&[
        "--cmdline",
        CMDLINE,
        "--virtio-transport",
        "pci",
        "--disk",
        &format!("{},format=raw", pci_disk.display()),
        "--disk",
        &format!("{},format=raw,transport=mmio", mmio_disk.display()),
        "--rng",
    ]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);

    // The host bridge in slot 0, then the virtio-pci functions in device order:
    // virtio-blk (0x1040 + 2) and virtio-rng (0x1040 + 4).
    let ids = c.run(
        "for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor $d/device $d/class); done",
        CMD,
    );
    assert_eq!(
        ids.lines().map(str::trim).collect::<Vec<_>>(),
        vec![
            "0000:00:00.0 0x1b36 0x0008 0x060000",
            "0000:00:01.0 0x1af4 0x1042 0x010000",
            "0000:00:02.0 0x1af4 0x1044 0x00ff00",
        ],
        "{ids}"
    );
    let drivers = c.run("ls /sys/bus/pci/drivers/virtio-pci", CMD);
    assert!(
        drivers.contains("0000:00:01.0") && drivers.contains("0000:00:02.0"),
        "{drivers}"
    );

    // One MSI-X vector for configuration changes and one per queue, per device.
    let irqs = c.run("grep virtio /proc/interrupts", CMD);
    let msix: Vec<&str> = irqs.lines().filter(|l| l.contains("PCI-MSI")).collect();
    assert!(
        msix.iter().any(|l| l.contains("-config")) && msix.iter().any(|l| l.contains("-req.0")),
        "{irqs}"
    );
    assert!(
        msix.iter().any(|l| l.contains("-input")),
        "virtio-rng's queue has its vector: {irqs}"
    );

    // Which vdX is which disk: the serial is the image's file name, and the PCI one
    // hangs below its function in sysfs.
    let disks = c.run(
        "for b in /sys/block/vd*; do echo ${b##*/} $(cat $b/serial) $(readlink -f $b); done",
        CMD,
    );
    let dev_of = |serial: &str| -> (String, String) {
        let line = disks
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(serial))
            .unwrap_or_else(|| panic!("no disk with serial {serial}: {disks}"));
        let mut f = line.split_whitespace();
        (f.next().unwrap().to_string(), f.nth(1).unwrap().to_string())
    };
    let (pci_dev, pci_path) = dev_of("pci.raw");
    let (mmio_dev, mmio_path) = dev_of("mmio.raw");
    assert!(pci_path.contains("/pci0000:00/0000:00:01.0/"), "{pci_path}");
    assert!(!mmio_path.contains("/pci0000:00/"), "{mmio_path}");

    // Writes from the guest land in the images; what the host wrote, the guest reads.
    let token = format!("through-virtio-pci-{}", std::process::id());
    c.run(
        &format!(
            "echo {token} | dd of=/dev/{pci_dev} bs=512 seek=8 conv=sync,fsync 2>/dev/null; \
             echo via-mmio | dd of=/dev/{mmio_dev} bs=512 conv=sync,fsync 2>/dev/null"
        ),
        CMD,
    );
    let back = c.run(
        &format!("dd if=/dev/{pci_dev} bs=512 skip=8 count=1 2>/dev/null | head -n1"),
        CMD,
    );
    assert_eq!(back, token);
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
    let img = std::fs::read(&pci_disk).unwrap();
    assert!(
        img[8 * 512..].starts_with(token.as_bytes()),
        "the token is not at sector 8 of the PCI disk image"
    );
    assert!(std::fs::read(&mmio_disk).unwrap().starts_with(b"via-mmio"));
}

#[test]
fn without_pci_devices_the_guest_still_finds_the_host_bridge_and_ecam() {
    let mut c = Console::boot(&["--cmdline", "console=ttyS0 panic=-1"]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    let log = c.run("dmesg | grep -E 'MMCONFIG|PCI host bridge|Fatal'", CMD);
    assert!(
        log.contains("reserved in ACPI motherboard resources"),
        "ECAM from MCFG is accepted: {log}"
    );
    assert!(log.contains("PCI host bridge to bus 0000:00"), "{log}");
    assert!(!log.contains("Fatal"), "{log}");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}
