//! Booting through firmware users already trust: Debian's SeaBIOS (`bios.bin`, run as
//! shipped) on the emu accelerator, from the reset vector in real mode. It finds the
//! machine through fw_cfg (memory, E820, its console on COM1), sets the PCI bus up
//! itself, and reads the boot sector of a virtio-pci disk with its own virtio driver.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

const SEABIOS: &str = "/usr/share/seabios/bios.bin";
const LINUXBOOT: &str = "/usr/share/qemu/linuxboot.bin";

fn seabios() -> PathBuf {
    let p = PathBuf::from(SEABIOS);
    assert!(
        p.is_file(),
        "{SEABIOS} is missing: install Debian's SeaBIOS (apt-get install seabios)"
    );
    p
}

/// A boot sector that looks for the ACPI RSDP in the BIOS area (16-byte steps from
/// 0xe0000), prints a line on COM1 — `message`, with `+RSDP` first if it found one —
/// and powers the machine off through the ACPI sleep control register (S5).
fn boot_sector(message: &str) -> Vec<u8> {
    // The message sits at a fixed place in the sector: 16-bit code has no RIP-relative
    // LEA.
    const MSG_OFFSET: usize = 0x100;
    let mut a = CodeAssembler::new(16).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut halt = a.create_label();
    let mut scan = a.create_label();
    let mut step = a.create_label();
    let mut print = a.create_label();
    a.cli().unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    // "RSD PTR " at DS:0 for DS = 0xe000, 0xe001, … 0xffff.
    a.mov(ax, 0xe000u32).unwrap();
    a.xor(si, si).unwrap();
    a.set_label(&mut scan).unwrap();
    a.mov(ds, ax).unwrap();
    a.cmp(dword_ptr(si), 0x2044_5352).unwrap();
    a.jne(step).unwrap();
    a.cmp(dword_ptr(si + 4), 0x2052_5450).unwrap();
    a.jne(step).unwrap();
    a.mov(al, b'+' as u32).unwrap();
    a.out(dx, al).unwrap();
    for c in b"RSDP" {
        a.mov(al, u32::from(*c)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.jmp(print).unwrap();
    a.set_label(&mut step).unwrap();
    a.inc(ax).unwrap();
    a.jnz(scan).unwrap();
    a.set_label(&mut print).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(si, 0x7c00u32 + MSG_OFFSET as u32).unwrap();
    a.set_label(&mut next).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut done).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0x34u32).unwrap(); // SLP_EN | SLP_TYP 5
    a.out(dx, al).unwrap();
    a.set_label(&mut halt).unwrap();
    a.hlt().unwrap();
    a.jmp(halt).unwrap();
    let code = a.assemble(0x7c00).unwrap();
    assert!(code.len() <= MSG_OFFSET);
    assert!(
        MSG_OFFSET + message.len() < 446,
        "the message runs into the partition table"
    );
    let mut sector = vec![0u8; 512];
    sector[..code.len()].copy_from_slice(&code);
    sector[MSG_OFFSET..MSG_OFFSET + message.len()].copy_from_slice(message.as_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

fn run_firmware(extra: &[&str], limit: Duration) -> Finished {
    run_with_timeout(
        vessel()
            .args(["run", "--accel", "emu", "--memory", "256M", "--firmware"])
            .arg(seabios())
            .args(extra),
        limit,
    )
}

#[test]
fn seabios_boots_from_a_virtio_pci_disk() {
    let dir = TempDir::new("seabios-mbr");
    let mut image = boot_sector("\r\nvessel-mbr: loaded by the BIOS\r\n");
    image.resize(1 << 20, 0);
    let disk = dir.file("boot.raw", &image);
    let f = run_firmware(
        &[
            "--disk",
            &format!("{},format=raw,transport=pci", disk.display()),
        ],
        Duration::from_secs(60),
    );
    let out = &f.stdout;
    assert_eq!(
        f.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
    assert!(out.contains("SeaBIOS (version"), "the banner: {out}");
    assert!(out.contains("Booting from Hard Disk"), "{out}");
    assert!(out.contains("vessel-mbr: loaded by the BIOS"), "{out}");
    // The ACPI tables went through fw_cfg's table loader: SeaBIOS put the RSDP in the
    // BIOS area, where an OS looks for it.
    assert!(out.contains("+RSDP"), "no RSDP below 1 MiB: {out}");
}

#[test]
fn seabios_with_nothing_to_boot_prints_its_banner_and_resets() {
    let f = run_firmware(
        &["--virtio-transport", "pci", "--rng"],
        Duration::from_secs(30),
    );
    let out = &f.stdout;
    assert!(out.contains("SeaBIOS (version"), "the banner: {out}");
    assert!(out.contains("No bootable device"), "{out}");
    // It retries after the 5 s fw_cfg asks for, by resetting: the VM ends as on a
    // guest reboot.
    assert_eq!(
        f.status.code(),
        Some(10),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
}

#[test]
fn debians_kernel_boots_through_seabios_with_acpi_pci_and_a_virtio_pci_disk() {
    // Direct boot through firmware, as QEMU does it: the kernel, initrd and command line
    // in fw_cfg, QEMU's linuxboot option ROM (as Debian ships it) copying them into
    // place and entering the kernel's real-mode setup code.
    assert!(
        PathBuf::from(LINUXBOOT).is_file(),
        "{LINUXBOOT} is missing: install QEMU's option ROMs (apt-get install qemu-system-data)"
    );
    let a = assets();
    let dir = TempDir::new("seabios-linux");
    let token = format!("vessel-fw-{}", std::process::id());
    let mut image = token.clone().into_bytes();
    image.resize(1 << 20, 0);
    let disk = dir.file("data.raw", &image);
    let f = run_firmware(
        &[
            "--option-rom",
            LINUXBOOT,
            "--kernel",
            a.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            a.join("initramfs.cpio.gz").to_str().unwrap(),
            "--disk",
            &format!("{},format=raw,transport=pci", disk.display()),
            "--cmdline",
            "console=ttyS0 panic=-1 quiet vessel.run=dmesg|grep+-E+'ACPI:+RSDP|PCI+Root';\
             head+-c32+/dev/vda;echo",
        ],
        Duration::from_secs(120),
    );
    let out = &f.stdout;
    assert_eq!(
        f.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
    assert!(out.contains("SeaBIOS (version"), "{out}");
    assert!(out.contains("vessel-init:"), "the initramfs ran: {out}");
    // The RSDP SeaBIOS placed from the table loader, with Vessel's tables behind it.
    assert!(
        out.contains("ACPI: RSDP") && out.contains("VESSEL"),
        "{out}"
    );
    assert!(out.contains("PCI Root Bridge [PCI0]"), "{out}");
    assert!(
        out.contains(&token),
        "the virtio-pci disk reads back: {out}"
    );
}

/// `text` without ANSI escape sequences (ESC [ parameters final-byte, ESC c).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // Parameters and intermediates, then one final byte in @..~.
            for p in chars.by_ref() {
                if ('@'..='~').contains(&p) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// SeaBIOS → GRUB (reading the disk through the BIOS, i.e. SeaBIOS's virtio-pci driver)
/// → grub.cfg → the kernel and initramfs, from a disk scripts/grub-bios-disk.sh built
/// with GRUB's `linux_cmd` (`linux16` or `linux`) and `loglevel`. `by_default`: as
/// `vessel run --disk IMAGE` alone boots it (SeaBIOS and virtio-pci chosen for a disk
/// with no kernel), else with `--firmware` and `transport=pci` spelt out. Returns the
/// console.
fn boot_grub_disk(linux_cmd: &str, loglevel: &str, marker: &str, by_default: bool) -> String {
    let a = assets();
    let dir = TempDir::new("seabios-grub");
    let disk = dir.path().join("grub.raw");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/grub-bios-disk.sh");
    let st = std::process::Command::new("bash")
        .arg(script)
        .arg(&disk)
        .arg(a.join("vmlinuz"))
        .arg(a.join("initramfs.cpio.gz"))
        .arg(format!(
            "console=ttyS0 panic=-1 {loglevel} vessel.run=echo+{marker}"
        ))
        .env("GRUB_LINUX", linux_cmd)
        .status()
        .expect("bash");
    assert!(
        st.success(),
        "scripts/grub-bios-disk.sh failed (needs grub-pc-bin and e2fsprogs)"
    );
    let f = if by_default {
        run_with_timeout(
            vessel()
                .args(["run", "--accel", "emu", "--memory", "256M", "--disk"])
                .arg(&disk),
            Duration::from_secs(120),
        )
    } else {
        run_firmware(
            &[
                "--disk",
                &format!("{},format=raw,transport=pci", disk.display()),
            ],
            Duration::from_secs(120),
        )
    };
    // GRUB draws through SeaBIOS's serial console with cursor moves, which may land
    // inside a line: compare the text without them.
    let out = strip_escapes(&f.stdout);
    assert_eq!(
        f.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
    assert!(out.contains("GRUB loading"), "{out}");
    assert!(
        out.contains("vessel-grub: loading the kernel"),
        "grub.cfg ran: {out}"
    );
    assert!(out.contains("vessel-init:"), "the initramfs ran: {out}");
    assert!(out.contains(marker), "{out}");
    out
}

#[test]
fn grub_on_a_virtio_pci_disk_boots_debians_kernel_through_seabios() {
    // linux16: GRUB enters the kernel through its real-mode setup code.
    boot_grub_disk("linux16", "quiet", "vessel-booted-by-grub", false);
}

#[test]
fn grubs_32_bit_linux_entry_boots_on_a_full_acpi_platform() {
    // linux: GRUB's 32-bit entry, as distribution grub.cfg files use. SeaBIOS leaves the
    // 8259 unmasked with the PIT ticking on IRQ 0 at vector 8; only on a full ACPI
    // platform (FADT with PM1 blocks, SCI, FACS) does Linux mask it before enabling
    // interrupts — on a hardware-reduced one its first tick was a double fault.
    // Booted as `vessel run --disk IMAGE`, with nothing else said.
    let out = boot_grub_disk("linux", "loglevel=7", "vessel-booted-by-grub-32", true);
    assert!(out.contains("ACPI: FACS"), "a full ACPI platform: {out}");
}

#[test]
fn linuxboot_dma_loads_the_kernel_through_fw_cfg_dma() {
    // QEMU's linuxboot_dma.bin (what QEMU itself uses for -kernel) reads the kernel,
    // initrd and command line with fw_cfg's DMA interface, which it finds in the feature
    // bitmap: whole items copied into guest memory by the VMM, not byte by byte.
    const LINUXBOOT_DMA: &str = "/usr/share/qemu/linuxboot_dma.bin";
    assert!(
        PathBuf::from(LINUXBOOT_DMA).is_file(),
        "{LINUXBOOT_DMA} is missing: install QEMU's option ROMs (apt-get install qemu-system-data)"
    );
    let a = assets();
    let token = format!("vessel-fw-dma-{}", std::process::id());
    let f = run_firmware(
        &[
            "--option-rom",
            LINUXBOOT_DMA,
            "--kernel",
            a.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            a.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cmdline",
            &format!("console=ttyS0 panic=-1 quiet vessel.run=echo+{token}"),
        ],
        Duration::from_secs(120),
    );
    let out = &f.stdout;
    assert_eq!(
        f.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
    assert!(out.contains("vessel-init:"), "the initramfs ran: {out}");
    assert!(
        out.contains(&token),
        "the command line arrived whole: {out}"
    );
}
