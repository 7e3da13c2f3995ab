//! A small generated guest that drives PCI by hand, run on both accelerators: the host
//! bridge through the 0xcf8/0xcfc ports, a virtio-pci function through ECAM, BAR sizing
//! and placement, the MSI-X capability and table, then one virtio-rng request whose
//! completion must arrive as the MSI-X message the guest programmed. With `kvm` that
//! message goes through KVM_SIGNAL_MSI to the in-kernel LAPIC; with `emu` through the
//! user-space chip. The same with a virtio-blk read, after the guest moved the BAR: its
//! notify must reach the I/O thread through the accelerator's ioeventfd at the BAR's new
//! place, not through the VMM's buses.

mod common;

use std::time::Duration;

use common::guest::*;
use common::*;
use iced_x86::code_asm::*;

const ECAM: u32 = 0xe000_0000;
const BAR: u32 = 0xc000_0000;
/// Where the blk test first places the BAR, before moving it to `BAR`.
const BAR_FIRST: u32 = 0xc010_0000;
const DESC: u64 = 0x20_0000;
const AVAIL: u64 = 0x20_1000;
const USED: u64 = 0x20_2000;
const BUF: u64 = 0x20_3000;
const HDR: u64 = 0x20_4000;
const STATUS: u64 = 0x20_4100;
const MSIX_VECTOR: u8 = 0x41;

/// Which device the guest drives: virtio-rng (one 16-byte buffer) or virtio-blk (a read
/// of sector 0 into 512 bytes, after moving the BAR once).
#[derive(Clone, Copy, PartialEq)]
enum Dev {
    Rng,
    Blk,
}

fn program(dev: Dev) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    body(&mut a, &lib, dev).unwrap();
    lib.emit(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

fn body(a: &mut CodeAssembler, lib: &Lib64, dev: Dev) -> Result<(), IcedError> {
    let mut handler = a.create_label();
    install_exception_handlers(a, lib)?;
    set_idt_gate(a, MSIX_VECTOR, handler)?;
    // Both 8259s masked, the local APIC enabled.
    a.mov(al, 0xff)?;
    a.out(0x21, al)?;
    a.out(0xa1, al)?;
    a.mov(eax, 0xfee0_00f0u32)?;
    a.mov(dword_ptr(rax), 0x1ff)?;

    // The host bridge, through configuration mechanism #1.
    lib.print(a, "BRIDGE ")?;
    a.mov(dx, 0xcf8)?;
    a.mov(eax, 0x8000_0000u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfc)?;
    a.in_(eax, dx)?;
    a.call(lib.puthex)?;

    // Slot 1 through ECAM: IDs, then BAR 0 sized and placed, memory and bus mastering on.
    a.mov(ebx, ECAM + (1 << 15))?;
    lib.print(a, "\nFUNC ")?;
    a.mov(eax, dword_ptr(rbx))?;
    a.call(lib.puthex)?;
    a.mov(dword_ptr(rbx + 0x10), -1)?;
    lib.print(a, "\nBAR ")?;
    a.mov(eax, dword_ptr(rbx + 0x10))?;
    a.call(lib.puthex)?;
    if dev == Dev::Blk {
        // Placed and decoding, then moved: the notify ioevents must follow.
        a.mov(dword_ptr(rbx + 0x10), BAR_FIRST as i32)?;
        a.mov(word_ptr(rbx + 4), 6)?;
    }
    a.mov(dword_ptr(rbx + 0x10), BAR as i32)?;
    a.mov(word_ptr(rbx + 4), 6)?;

    // Walk the capability list to MSI-X (ID 0x11) and enable it.
    let mut walk = a.create_label();
    let mut found = a.create_label();
    a.movzx(ecx, byte_ptr(rbx + 0x34))?;
    a.set_label(&mut walk)?;
    a.movzx(eax, byte_ptr(rbx + rcx))?;
    a.cmp(al, 0x11)?;
    a.je(found)?;
    a.movzx(ecx, byte_ptr(rbx + rcx + 1))?;
    a.test(ecx, ecx)?;
    a.jnz(walk)?;
    lib.print(a, "\nNO MSI-X\n")?;
    debug_exit(a, 0x7e)?;
    a.set_label(&mut found)?;
    a.mov(word_ptr(rbx + rcx + 2), 0x8000)?;

    // MSI-X table entry 1 (BAR 0 + 0x4000): the local APIC, fixed vector, unmasked.
    a.mov(ebp, BAR)?;
    a.mov(dword_ptr(rbp + 0x4010), 0xfee0_0000u32 as i32)?;
    a.mov(dword_ptr(rbp + 0x4014), 0)?;
    a.mov(dword_ptr(rbp + 0x4018), u32::from(MSIX_VECTOR) as i32)?;
    a.mov(dword_ptr(rbp + 0x401c), 0)?;

    // virtio initialization (spec 3.1.1) through the common configuration at BAR 0.
    a.mov(byte_ptr(rbp + 0x14), 3)?; // ACKNOWLEDGE | DRIVER
    a.mov(dword_ptr(rbp + 0x08), 1)?; // driver_feature_select: bits 32..63
    a.mov(dword_ptr(rbp + 0x0c), 1)?; // VERSION_1
    a.mov(byte_ptr(rbp + 0x14), 0xb)?; // | FEATURES_OK
    lib.print(a, "\nSTATUS ")?;
    a.movzx(eax, byte_ptr(rbp + 0x14))?;
    a.call(lib.puthex)?;
    a.mov(word_ptr(rbp + 0x16), 0)?; // queue_select 0
    a.mov(word_ptr(rbp + 0x18), 16)?; // queue_size
    a.mov(word_ptr(rbp + 0x1a), 1)?; // queue_msix_vector
    lib.print(a, "\nVECTOR ")?;
    a.movzx(eax, word_ptr(rbp + 0x1a))?;
    a.call(lib.puthex)?;
    a.mov(dword_ptr(rbp + 0x20), DESC as i32)?;
    a.mov(dword_ptr(rbp + 0x24), 0)?;
    a.mov(dword_ptr(rbp + 0x28), AVAIL as i32)?;
    a.mov(dword_ptr(rbp + 0x2c), 0)?;
    a.mov(dword_ptr(rbp + 0x30), USED as i32)?;
    a.mov(dword_ptr(rbp + 0x34), 0)?;
    a.mov(word_ptr(rbp + 0x1c), 1)?; // queue_enable
    a.mov(byte_ptr(rbp + 0x14), 0xf)?; // | DRIVER_OK

    a.mov(rdi, DESC)?;
    match dev {
        // One 16-byte device-writable buffer, made available and notified.
        Dev::Rng => {
            a.mov(rax, BUF)?;
            a.mov(qword_ptr(rdi), rax)?;
            a.mov(dword_ptr(rdi + 8), 16)?;
            a.mov(word_ptr(rdi + 12), 2)?;
        }
        // A read of sector 0: header (readable), 512 bytes, the status byte.
        Dev::Blk => {
            a.mov(rax, HDR)?;
            a.mov(qword_ptr(rax), 0)?;
            a.mov(qword_ptr(rax + 8), 0)?;
            for (i, (addr, len, flags)) in [(HDR, 16u32, 1u32), (BUF, 512, 3), (STATUS, 1, 2)]
                .into_iter()
                .enumerate()
            {
                let d = i as i32 * 16;
                a.mov(rax, addr)?;
                a.mov(qword_ptr(rdi + d), rax)?;
                a.mov(dword_ptr(rdi + d + 8), len)?;
                a.mov(dword_ptr(rdi + d + 12), flags | ((i as u32 + 1) << 16))?;
            }
            // A notify for a queue the device does not have matches no ioevent: it
            // reaches the transport, which logs it (so the log is known to work).
            a.mov(word_ptr(rbp + 7 * 4 + 0x3000), 7)?;
        }
    }
    a.mov(rdi, AVAIL)?;
    a.mov(word_ptr(rdi + 4), 0)?;
    a.mov(word_ptr(rdi + 2), 1)?;
    lib.print(a, "\nNOTIFY\n")?;
    a.sti()?;
    a.movzx(eax, word_ptr(rbp + 0x1e))?; // queue_notify_off
    a.mov(word_ptr(rbp + rax * 4 + 0x3000), 0)?;
    let mut idle = a.create_label();
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;

    a.set_label(&mut handler)?;
    lib.print(a, "MSIX used=")?;
    a.mov(rdi, USED)?;
    a.movzx(eax, word_ptr(rdi + 2))?;
    a.call(lib.puthex)?;
    lib.print(a, " len=")?;
    a.mov(eax, dword_ptr(rdi + 8))?;
    a.call(lib.puthex)?;
    if dev == Dev::Blk {
        lib.print(a, " status=")?;
        a.mov(rdi, STATUS)?;
        a.movzx(eax, byte_ptr(rdi))?;
        a.call(lib.puthex)?;
        lib.print(a, " data=")?;
        a.mov(rdi, BUF)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.call(lib.puthex)?;
    }
    lib.print(a, "\n")?;
    debug_exit(a, MSIX_VECTOR)
}

fn run_on(accel: &str) {
    let dir = TempDir::new(&format!("pci-{accel}"));
    let k = dir.file("kernel.elf", &linux64_elf(&program(Dev::Rng)));
    let f = run_with_timeout(
        vessel()
            .args(["run", "--accel", accel, "--memory", "256M", "--kernel"])
            .arg(&k)
            .args(["--virtio-transport", "pci", "--rng"]),
        Duration::from_secs(60),
    );
    let out = &f.stdout;
    assert_eq!(
        f.status.code(),
        Some((i32::from(MSIX_VECTOR) << 1) | 1),
        "stdout:\n{out}\nstderr:\n{}",
        f.stderr
    );
    let want = [
        "BRIDGE 0000000000081b36",
        "FUNC 0000000010441af4",
        "BAR 00000000ffff8000",
        "STATUS 000000000000000b",
        "VECTOR 0000000000000001",
        "MSIX used=0000000000000001 len=0000000000000010",
    ];
    for w in want {
        assert!(out.contains(w), "{accel}: {w:?} missing from:\n{out}");
    }
}

#[test]
fn a_hand_driven_virtio_pci_request_completes_by_msix_on_kvm() {
    run_on("kvm");
}

#[test]
fn a_hand_driven_virtio_pci_request_completes_by_msix_on_emu() {
    run_on("emu");
}

/// A hand-driven virtio-pci blk request whose BAR moves: KVM's notifies are ioevents that
/// follow the BAR; emu's reach the transport on the vCPU thread.
fn blk_notify_on(accel: &str) {
    let dir = TempDir::new(&format!("pci-blk-{accel}"));
    let mut disk = b"VESSELOK".to_vec();
    disk.resize(1 << 20, 0);
    let disk = dir.file("disk.raw", &disk);
    let k = dir.file("kernel.elf", &linux64_elf(&program(Dev::Blk)));
    let f = run_with_timeout(
        vessel()
            .env("VESSEL_LOG", "virtio::transport=trace,virtio::pci=debug")
            .args(["run", "--accel", accel, "--memory", "256M", "--kernel"])
            .arg(&k)
            .args(["--virtio-transport", "pci", "--disk"])
            .arg(format!("{},format=raw", disk.display())),
        Duration::from_secs(60),
    );
    let (out, err) = (&f.stdout, &f.stderr);
    assert_eq!(
        f.status.code(),
        Some((i32::from(MSIX_VECTOR) << 1) | 1),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    let want = format!(
        "MSIX used=0000000000000001 len=0000000000000201 status=0000000000000000 data={:016x}",
        u64::from_le_bytes(*b"VESSELOK")
    );
    assert!(
        out.contains(&want),
        "{accel}: {want:?} missing from:\n{out}"
    );
    let through_transport: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("queue notify through the transport"))
        .collect();
    if accel == "emu" {
        // A software CPU's MMIO write reaches the transport on the vCPU thread, which
        // serves blk's reads there: no ioevent at all, both notifies through the
        // transport.
        assert!(
            !err.contains("base="),
            "emu: blk registered notify ioevents:\n{err}"
        );
        assert!(
            through_transport.len() == 2
                && through_transport.iter().any(|l| l.contains("queue=0"))
                && through_transport.iter().any(|l| l.contains("queue=7")),
            "emu: queue 0's and queue 7's notifies should reach the transport:\n{err}"
        );
        return;
    }
    // The ioevents went to the first place, then followed the BAR.
    for base in [BAR_FIRST, BAR] {
        assert!(
            err.contains(&format!("base={base}")),
            "{accel}: no notify ioevents registered at {base:#x}:\n{err}"
        );
    }
    assert!(
        !err.contains("notify ioevent:"),
        "{accel}: an ioevent failed:\n{err}"
    );
    assert!(
        through_transport.len() == 1 && through_transport[0].contains("queue=7"),
        "{accel}: queue 0's notify should signal the ioeventfd, queue 7's reach the \
         transport:\n{err}"
    );
}

#[test]
fn a_virtio_pci_blk_notify_follows_the_bar_as_an_ioevent_on_kvm() {
    blk_notify_on("kvm");
}

#[test]
fn a_virtio_pci_blk_notify_is_served_on_the_vcpu_on_emu() {
    blk_notify_on("emu");
}
