//! Small generated guests on this machine's real /dev/kvm, booted through the real
//! loader and `vessel run`: boot protocols, the vCPU loop at CPL3, the UART with its
//! interrupt, and the ways a VM ends.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use iced_x86::code_asm::*;

const MEM: &str = "256M";
const MEM_BYTES: u64 = 256 << 20;

fn assemble64(body: impl FnOnce(&mut CodeAssembler, &Lib64) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    body(&mut a, &lib).unwrap();
    lib.emit(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

fn run_kernel(dir: &TempDir, kernel: &[u8], extra: &[&str]) -> Finished {
    let k = dir.file("kernel.elf", kernel);
    run_with_timeout(
        vessel()
            .args(["run", "--accel", "kvm", "--memory", MEM, "--kernel"])
            .arg(&k)
            .args(extra),
        Duration::from_secs(60),
    )
}

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim(), 16).unwrap_or_else(|_| panic!("not hex: {s:?}"))
}

fn expect_status(f: &Finished, code: i32) {
    assert_eq!(
        f.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
}

#[test]
fn linux64_guest_reads_boot_params_where_rsi_points() {
    let code = assemble64(|a, lib| {
        a.mov(rbx, rsi)?;
        lib.print(a, "CMDLINE=")?;
        a.mov(esi, dword_ptr(rbx + 0x228))?;
        a.call(lib.puts)?;
        lib.print(a, "\nINITRD=")?;
        a.mov(eax, dword_ptr(rbx + 0x218))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(eax, dword_ptr(rbx + 0x21c))?;
        a.call(lib.puthex)?;
        lib.print(a, "\nE820=")?;
        a.movzx(eax, byte_ptr(rbx + 0x1e8))?;
        a.call(lib.puthex)?;
        lib.print(a, "\n")?;
        a.movzx(r12d, byte_ptr(rbx + 0x1e8))?;
        a.lea(r13, ptr(rbx + 0x2d0))?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.test(r12, r12)?;
        a.jz(done)?;
        a.mov(rax, qword_ptr(r13))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(rax, qword_ptr(r13 + 8))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(eax, dword_ptr(r13 + 16))?;
        a.call(lib.puthex)?;
        lib.print(a, "\n")?;
        a.add(r13, 20)?;
        a.dec(r12)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        lib.print(a, "END\n")?;
        debug_exit(a, 0x10)
    });
    let dir = TempDir::new("bp");
    let initrd = dir.file("initrd", &vec![0x5a; 12345]);
    let cmdline = "console=ttyS0 vessel.test=boot-params quiet";
    let f = run_kernel(
        &dir,
        &linux64_elf(&code),
        &[
            "--cmdline",
            cmdline,
            "--serial",
            "stdio",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    expect_status(&f, (0x10 << 1) | 1);

    let out = &f.stdout;
    let line = |tag: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} in guest output:\n{out}"))
            .to_string()
    };
    assert_eq!(line("CMDLINE="), cmdline);
    let initrd_line = line("INITRD=");
    let (addr, size) = initrd_line.split_once(' ').unwrap();
    assert_eq!(parse_hex(size), 12345);
    // The loader puts the initrd at the top of RAM, page aligned.
    assert_eq!(parse_hex(addr), (MEM_BYTES - 12345) & !0xfff);
    let n = parse_hex(&line("E820=")) as usize;
    let want = arch::e820::memory_map(MEM_BYTES);
    assert_eq!(n, want.len());
    let got: Vec<arch::e820::E820Entry> = out
        .lines()
        .skip_while(|l| !l.starts_with("E820="))
        .skip(1)
        .take(n)
        .map(|l| {
            let f: Vec<u64> = l.split(' ').map(parse_hex).collect();
            arch::e820::E820Entry {
                addr: f[0],
                size: f[1],
                kind: f[2] as u32,
            }
        })
        .collect();
    assert_eq!(got, want);
    assert!(out.contains("END"));
}

#[test]
fn pvh_guest_reads_hvm_start_info_where_ebx_points() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut lib = Lib32::new(&mut a);
    (|| -> Result<(), IcedError> {
        let a = &mut a;
        a.mov(esp, 0x8ff0)?;
        lib.print(a, "MAGIC=")?;
        a.mov(eax, dword_ptr(ebx))?;
        a.call(lib.puthex)?;
        lib.print(a, "\nCMDLINE=")?;
        a.mov(esi, dword_ptr(ebx + 24))?;
        a.call(lib.puts)?;
        lib.print(a, "\nMODULE=")?;
        a.mov(edi, dword_ptr(ebx + 16))?;
        a.mov(eax, dword_ptr(edi))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(eax, dword_ptr(edi + 8))?;
        a.call(lib.puthex)?;
        lib.print(a, "\nMEMMAP=")?;
        a.mov(eax, dword_ptr(ebx + 48))?;
        a.call(lib.puthex)?;
        lib.print(a, "\n")?;
        a.mov(ecx, dword_ptr(ebx + 48))?;
        a.mov(edi, dword_ptr(ebx + 40))?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.test(ecx, ecx)?;
        a.jz(done)?;
        for (off, sep) in [(4, ""), (0, " "), (12, ""), (8, " "), (16, "\n")] {
            a.mov(eax, dword_ptr(edi + off))?;
            a.call(lib.puthex)?;
            if !sep.is_empty() {
                lib.print(a, sep)?;
            }
        }
        a.add(edi, 24)?;
        a.dec(ecx)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        lib.print(a, "END\n")?;
        a.mov(dx, DEBUG_EXIT)?;
        a.mov(al, 0x11)?;
        a.out(dx, al)?;
        a.hlt()?;
        lib.emit(a)
    })()
    .unwrap();
    let code = a.assemble(LOAD).unwrap();
    let dir = TempDir::new("pvh");
    let initrd = dir.file("initrd", &[1u8; 5000]);
    let cmdline = "console=ttyS0 vessel.test=pvh";
    let f = run_kernel(
        &dir,
        &pvh_elf(&code),
        &["--cmdline", cmdline, "--initrd", initrd.to_str().unwrap()],
    );
    expect_status(&f, (0x11 << 1) | 1);
    let out = &f.stdout;
    assert!(out.contains("MAGIC=336ec578"), "{out}");
    assert!(out.contains(&format!("CMDLINE={cmdline}\n")), "{out}");
    assert!(
        out.contains(&format!(
            "MODULE={:08x} {:08x}",
            (MEM_BYTES - 5000) & !0xfff,
            5000
        )),
        "{out}"
    );
    let want = arch::e820::memory_map(MEM_BYTES);
    assert!(out.contains(&format!("MEMMAP={:08x}", want.len())), "{out}");
    for e in want {
        let l = format!("{:016x} {:016x} {:08x}", e.addr, e.size, e.kind);
        assert!(out.contains(&l), "missing {l} in:\n{out}");
    }
}

/// The user segments a CPL3 test guest installs: null, kernel code/data, user data/code.
fn cpl3_prologue(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    const GDT: u64 = 0x3000;
    const GDTR: u64 = 0x3100;
    a.mov(rdi, GDT)?;
    // Kernel code stays at 0x10, where the boot GDT (and the IDT gates) have it.
    for (i, d) in [
        0u64,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        a.mov(rax, *d)?;
        a.mov(qword_ptr(rdi + (i * 8) as i32), rax)?;
    }
    a.mov(rdi, GDTR)?;
    a.mov(word_ptr(rdi), 6 * 8 - 1)?;
    a.mov(rax, GDT)?;
    a.mov(qword_ptr(rdi + 2), rax)?;
    a.lgdt(ptr(rdi))?;
    let user = a.create_label();
    a.push(0x23)?; // SS: user data | RPL 3
    a.push(0x5ff0)?; // user stack
    a.push(0x2)?; // RFLAGS: interrupts off
    a.push(0x2b)?; // CS: user code | RPL 3
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;
    Ok(user)
}

#[test]
fn cpl3_loop_of_100_million_iterations_runs_natively() {
    // PVM neither honours IOPL for port I/O at CPL3 nor delivers `int n` from there, so
    // the user code reports the way every CPL3 program can: a privileged instruction
    // (HLT) raises #GP, whose frame carries the user CS and whose handler prints RBX.
    let code = assemble64(|a, lib| {
        install_exception_handlers(a, lib)?;
        let mut user = cpl3_prologue(a)?;
        a.set_label(&mut user)?;
        a.mov(ecx, 100_000_000)?;
        a.xor(eax, eax)?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.add(rax, rcx)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        a.mov(rbx, rax)?;
        a.hlt()
    });
    let dir = TempDir::new("cpl3");
    let start = Instant::now();
    let f = run_kernel(&dir, &linux64_elf(&code), &[]);
    expect_status(&f, (0x7f << 1) | 1);
    let sum: u64 = (1..=100_000_000u64).sum();
    // #GP (0xd), error 0, from CS 0x2b: the loop ran in the user code segment, at CPL3.
    let line = f
        .stdout
        .lines()
        .find(|l| l.starts_with("EXC "))
        .unwrap_or_else(|| panic!("no exception report:\n{}", f.stdout));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], "000000000000000d", "{line}");
    assert_eq!(fields[2], "0000000000000000", "{line}");
    assert_eq!(fields[4], "000000000000002b", "{line}");
    assert_eq!(fields[5], format!("rbx={sum:016x}"), "{line}");
    eprintln!("100M-iteration CPL3 loop: {:?} end to end", start.elapsed());
}

#[test]
fn uart_input_arrives_by_interrupt_through_the_in_kernel_irqchip() {
    let code = assemble64(|a, lib| {
        let mut handler = a.create_label();
        // IDT at 0x4000 with one interrupt gate, vector 0x24, for the UART's GSI 4.
        set_idt_gate(a, 0x24, handler)?;
        load_idt(a)?;
        // Mask both 8259s; enable the local APIC; route IOAPIC pin 4 to vector 0x24.
        a.mov(al, 0xff)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        a.mov(eax, 0xfee0_00f0u32)?;
        a.mov(dword_ptr(rax), 0x1ff)?;
        a.mov(eax, 0xfec0_0000u32)?;
        a.mov(dword_ptr(rax), 0x18)?;
        a.mov(dword_ptr(rax + 0x10), 0x24)?;
        a.mov(dword_ptr(rax), 0x19)?;
        a.mov(dword_ptr(rax + 0x10), 0)?;
        // UART: received-data interrupt on, OUT2 set.
        a.mov(dx, COM1 + 1)?;
        a.mov(al, 1)?;
        a.out(dx, al)?;
        a.mov(dx, COM1 + 4)?;
        a.mov(al, 0x0b)?;
        a.out(dx, al)?;
        lib.print(a, "READY\n")?;
        a.sti()?;
        let mut idle = a.create_label();
        a.set_label(&mut idle)?;
        a.hlt()?;
        a.jmp(idle)?;

        a.set_label(&mut handler)?;
        a.nop()?;
        let mut rx = a.create_label();
        let mut done = a.create_label();
        let mut send = a.create_label();
        let mut finish = a.create_label();
        a.set_label(&mut rx)?;
        a.mov(dx, COM1 + 5)?;
        a.in_(al, dx)?;
        a.test(al, 1)?;
        a.jz(done)?;
        a.mov(dx, COM1)?;
        a.in_(al, dx)?;
        a.cmp(al, b'!' as i32)?;
        a.je(finish)?;
        a.cmp(al, b'a' as i32)?;
        a.jb(send)?;
        a.cmp(al, b'z' as i32)?;
        a.ja(send)?;
        a.sub(al, 0x20)?;
        a.set_label(&mut send)?;
        a.call(lib.putc)?;
        a.jmp(rx)?;
        a.set_label(&mut done)?;
        a.mov(eax, 0xfee0_00b0u32)?;
        a.mov(dword_ptr(rax), 0)?;
        a.iretq()?;
        a.set_label(&mut finish)?;
        lib.print(a, "\nBANG\n")?;
        debug_exit(a, 0x33)
    });
    let dir = TempDir::new("uart");
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let child = vessel()
        .args([
            "run", "--accel", "kvm", "--memory", MEM, "--serial", "stdio", "--kernel",
        ])
        .arg(&k)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = Guarded(child);
    let mut stdout = g.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<u8>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.extend(chunk),
                Err(_) => panic!(
                    "guest never printed {needle:?}; output so far:\n{}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    };
    wait_for("READY\n", &mut seen);
    let mut stdin = g.0.stdin.take().unwrap();
    stdin.write_all(b"hello vessel").unwrap();
    stdin.flush().unwrap();
    wait_for("HELLO VESSEL", &mut seen);
    stdin.write_all(b"!").unwrap();
    stdin.flush().unwrap();
    wait_for("BANG", &mut seen);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vessel did not exit after BANG");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some((0x33 << 1) | 1));
}

#[test]
fn i8042_reset_ends_the_run_as_a_reboot() {
    let code = assemble64(|a, lib| {
        lib.print(a, "RESETTING\n")?;
        a.mov(al, 0xfe)?;
        a.out(0x64, al)?;
        a.hlt()?;
        Ok(())
    });
    let f = run_kernel(&TempDir::new("rst"), &linux64_elf(&code), &[]);
    expect_status(&f, 10);
    assert!(f.stdout.contains("RESETTING"));
    assert!(f.stderr.contains("guest rebooted"), "{}", f.stderr);
}

#[test]
fn acpi_s5_ends_the_run_as_a_power_off() {
    let code = assemble64(|a, _| {
        a.mov(dx, arch::acpi::SLEEP_CONTROL_PORT as u32)?;
        a.mov(al, (5 << 2) | 0x20)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    });
    let f = run_kernel(&TempDir::new("s5"), &linux64_elf(&code), &[]);
    expect_status(&f, 0);
    assert!(f.stderr.contains("powered off"), "{}", f.stderr);
}

#[test]
fn acpi_reset_register_reboots() {
    let code = assemble64(|a, _| {
        a.mov(dx, arch::acpi::RESET_PORT as u32)?;
        a.mov(al, arch::acpi::RESET_VALUE as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    });
    let f = run_kernel(&TempDir::new("acpirst"), &linux64_elf(&code), &[]);
    expect_status(&f, 10);
}

#[test]
fn a_triple_fault_ends_the_run() {
    // The boot IDT is empty: #UD escalates to a triple fault.
    let code = assemble64(|a, _| a.ud2());
    let f = run_kernel(&TempDir::new("tf"), &linux64_elf(&code), &[]);
    expect_status(&f, 12);
}

#[test]
fn serial_to_a_file() {
    let code = assemble64(|a, lib| {
        lib.print(a, "to a file\n")?;
        debug_exit(a, 0)
    });
    let dir = TempDir::new("sfile");
    let out = dir.path().join("console.log");
    let f = run_kernel(
        &dir,
        &linux64_elf(&code),
        &["--serial", &format!("file:{}", out.display())],
    );
    expect_status(&f, 1);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "to a file\n");
    assert!(!f.stdout.contains("to a file"));
}

#[test]
fn two_vcpus_boot_with_the_second_waiting_for_sipi() {
    let code = assemble64(|a, lib| {
        lib.print(a, "BSP\n")?;
        debug_exit(a, 0x5)
    });
    let f = run_kernel(&TempDir::new("smp"), &linux64_elf(&code), &["--cpus", "2"]);
    expect_status(&f, 0xb);
}

#[test]
fn virtio_mmio_devices_answer_at_their_windows() {
    // Reads magic, version and device ID of the first three virtio-mmio windows.
    let code = assemble64(|a, lib| {
        for i in 0..3u32 {
            let base = 0xd000_0000u32 + i * 0x1000;
            lib.print(a, "DEV ")?;
            for reg in [0u32, 4, 8] {
                a.mov(eax, base + reg)?;
                a.mov(eax, dword_ptr(rax))?;
                a.call(lib.puthex)?;
                lib.print(a, " ")?;
            }
            lib.print(a, "\n")?;
        }
        debug_exit(a, 0x1)
    });
    let dir = TempDir::new("virtio");
    let disk = dir.file("disk.raw", &vec![0u8; 1 << 20]);
    let f = run_kernel(
        &dir,
        &linux64_elf(&code),
        &["--disk", &format!("{},format=raw", disk.display()), "--rng"],
    );
    expect_status(&f, 3);
    let lines: Vec<&str> = f.stdout.lines().filter(|l| l.starts_with("DEV ")).collect();
    let magic = "0000000074726976 0000000000000002";
    assert_eq!(lines[0], format!("DEV {magic} 0000000000000002 "), "block");
    assert_eq!(lines[1], format!("DEV {magic} 0000000000000004 "), "rng");
    // Nothing at the third window: an unmapped MMIO read floats high.
    assert_eq!(
        lines[2],
        "DEV 00000000ffffffff 00000000ffffffff 00000000ffffffff "
    );
}

#[test]
fn a_virtio_blk_read_is_notified_by_ioeventfd_and_completes_by_irqfd() {
    // A driver in 60 instructions: one virtqueue, one read of sector 0, its completion
    // taken by interrupt. The notify must reach the I/O thread through KVM's ioeventfd
    // (the transport logs a notify that reaches it instead), the completion the guest
    // through KVM's irqfd on GSI 16.
    const VIRTIO: u32 = 0xd000_0000;
    const Q: u32 = 0x0200_0000; // descriptors; avail ring +0x1000, used ring +0x2000
    const HDR: u32 = Q + 0x3000;
    const ST: u32 = Q + 0x3100;
    const DATA: u32 = Q + 0x4000;
    let code = assemble64(|a, lib| {
        let mut handler = a.create_label();
        set_idt_gate(a, 0x30, handler)?;
        load_idt(a)?;
        // PICs masked, LAPIC on, IOAPIC pin 16 (the first virtio window's GSI) to 0x30.
        a.mov(al, 0xff)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        a.mov(eax, 0xfee0_00f0u32)?;
        a.mov(dword_ptr(rax), 0x1ff)?;
        a.mov(eax, 0xfec0_0000u32)?;
        a.mov(dword_ptr(rax), 0x30)?;
        a.mov(dword_ptr(rax + 0x10), 0x30)?;
        a.mov(dword_ptr(rax), 0x31)?;
        a.mov(dword_ptr(rax + 0x10), 0)?;
        let reg = |a: &mut CodeAssembler, off: u32, v: u32| -> Result<(), IcedError> {
            a.mov(eax, VIRTIO + off)?;
            a.mov(dword_ptr(rax), v)
        };
        // Features: VIRTIO_F_VERSION_1 only.
        reg(a, 0x70, 0)?;
        reg(a, 0x70, 3)?;
        reg(a, 0x24, 1)?;
        reg(a, 0x20, 1)?;
        reg(a, 0x24, 0)?;
        reg(a, 0x20, 0)?;
        reg(a, 0x70, 0xb)?;
        // Queue 0: 8 entries.
        reg(a, 0x30, 0)?;
        reg(a, 0x38, 8)?;
        reg(a, 0x80, Q)?;
        reg(a, 0x84, 0)?;
        reg(a, 0x90, Q + 0x1000)?;
        reg(a, 0x94, 0)?;
        reg(a, 0xa0, Q + 0x2000)?;
        reg(a, 0xa4, 0)?;
        reg(a, 0x44, 1)?;
        reg(a, 0x70, 0xf)?;
        // Request: header (IN, sector 0), 512 bytes of data, the status byte.
        a.mov(edi, HDR)?;
        a.mov(qword_ptr(rdi), 0)?;
        a.mov(qword_ptr(rdi + 8), 0)?;
        a.mov(edi, ST)?;
        a.mov(byte_ptr(rdi), 0xff)?;
        a.mov(edi, Q)?;
        for (i, (addr, len, flags)) in [(HDR, 16u32, 1u32), (DATA, 512, 3), (ST, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let d = i as i32 * 16;
            a.mov(dword_ptr(rdi + d), addr)?;
            a.mov(dword_ptr(rdi + d + 4), 0)?;
            a.mov(dword_ptr(rdi + d + 8), len)?;
            a.mov(dword_ptr(rdi + d + 12), flags | ((i as u32 + 1) << 16))?;
        }
        // avail: ring[0] = 0, then idx = 1.
        a.mov(edi, Q + 0x1000)?;
        a.mov(word_ptr(rdi + 4), 0)?;
        a.mov(word_ptr(rdi + 2), 1)?;
        lib.print(a, "NOTIFY\n")?;
        a.sti()?;
        // A notify for a queue the device does not have matches no ioevent: it reaches
        // the transport (and shows the log line below is written).
        reg(a, 0x50, 7)?;
        reg(a, 0x50, 0)?;
        let mut idle = a.create_label();
        a.set_label(&mut idle)?;
        a.hlt()?;
        a.jmp(idle)?;

        a.set_label(&mut handler)?;
        a.nop()?;
        lib.print(a, "IRQ ")?;
        a.mov(eax, VIRTIO + 0x60)?;
        a.mov(eax, dword_ptr(rax))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(edi, ST)?;
        a.movzx(eax, byte_ptr(rdi))?;
        a.call(lib.puthex)?;
        lib.print(a, " ")?;
        a.mov(edi, DATA)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.call(lib.puthex)?;
        lib.print(a, "\n")?;
        debug_exit(a, 0x5)
    });
    let dir = TempDir::new("virtio-eventfds");
    let mut disk = b"VESSELOK".to_vec();
    disk.resize(1 << 20, 0);
    let disk = dir.file("disk.raw", &disk);
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let f = run_with_timeout(
        vessel()
            .env("VESSEL_LOG", "virtio::transport=trace")
            .args(["run", "--accel", "kvm", "--memory", MEM, "--kernel"])
            .arg(&k)
            .args(["--disk", &format!("{},format=raw", disk.display())]),
        Duration::from_secs(60),
    );
    expect_status(&f, 0xb);
    assert!(f.stdout.contains("NOTIFY\n"), "{}", f.stdout);
    // Interrupt status: used ring; status byte 0 (OK); the sector's first 8 bytes.
    assert!(
        f.stdout.contains(&format!(
            "IRQ 0000000000000001 0000000000000000 {:016x}\n",
            u64::from_le_bytes(*b"VESSELOK")
        )),
        "stdout:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    let through_transport: Vec<&str> = f
        .stderr
        .lines()
        .filter(|l| l.contains("queue notify through the transport"))
        .collect();
    assert!(
        through_transport.len() == 1 && through_transport[0].contains("queue=7"),
        "queue 0's notify should signal KVM's ioeventfd, queue 7's reach the transport:\n{}",
        f.stderr
    );
}

#[test]
fn a_tap_backed_virtio_net_device_appears_in_its_window() {
    // vessel runs inside a network namespace this test creates, so its TAP lives there.
    let ns = NetNs::new("kvmnet");
    let code = assemble64(|a, lib| {
        lib.print(a, "DEV ")?;
        for reg in [0u32, 8, 0x100, 0x104] {
            a.mov(eax, 0xd000_0000u32 + reg)?;
            a.mov(eax, dword_ptr(rax))?;
            a.call(lib.puthex)?;
            lib.print(a, " ")?;
        }
        lib.print(a, "\n")?;
        debug_exit(a, 0x1)
    });
    let dir = TempDir::new("net");
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let f = run_with_timeout(
        ns.exec()
            .arg(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "--accel", "kvm", "--memory", MEM, "--kernel"])
            .arg(&k)
            .args(["--net", "tap=vsltest0,mac=52:54:00:01:02:03"]),
        Duration::from_secs(30),
    );
    expect_status(&f, 3);
    // Device ID 1 (net), and the MAC in the first six config bytes.
    assert!(
        f.stdout
            .contains("DEV 0000000074726976 0000000000000001 0000000001005452 0000000000000302 "),
        "{}",
        f.stdout
    );
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    // A guest that idles forever; the VMM must still end at once on SIGTERM.
    let code = assemble64(|a, lib| {
        lib.print(a, "IDLING\n")?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.hlt()?;
        a.jmp(l)
    });
    let dir = TempDir::new("term");
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let child = vessel()
        .args(["run", "--accel", "kvm", "--memory", MEM, "--kernel"])
        .arg(&k)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = Guarded(child);
    let mut out = g.0.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("IDLING") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "vessel exited before the guest ran");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: signalling a child process we spawned and still own.
    unsafe { libc::kill(g.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vessel ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    g.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("quit"), "{err}");
}

/// Issue 22: once the VM is built, a vCPU thread's KVM requests are held to its own
/// vCPU's descriptor. The `vcpu-foreign-fd` self-test makes each vCPU thread read
/// registers (KVM_GET_REGS, a request vCPU threads make) from the first vCPU's
/// descriptor, and the first vCPU from the VM's: that VMM ends with status 148 and a report
/// naming the request and the descriptor (`--seccomp kill`: SIGSYS), while `--seccomp
/// log` lets the call through and the guest runs to its end.
#[test]
fn a_vcpu_request_on_another_descriptor_ends_that_vmm() {
    use std::os::unix::process::ExitStatusExt;
    let code = assemble64(|a, lib| {
        lib.print(a, "RAN\n")?;
        debug_exit(a, 0x5)
    });
    let dir = TempDir::new("foreignfd");
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let run = |cpus: &str, mode: &str| {
        run_with_timeout(
            vessel()
                .args(["run", "--accel", "kvm", "--memory", MEM, "--cpus", cpus])
                .args(["--seccomp", mode, "--kernel"])
                .arg(&k)
                .env("VESSEL_SECCOMP_SELFTEST", "vcpu-foreign-fd"),
            Duration::from_secs(60),
        )
    };
    for cpus in ["1", "2"] {
        let f = run(cpus, "trap");
        expect_status(&f, 148);
        assert!(
            f.stderr.contains("a vcpu thread (vcpu")
                && f.stderr
                    .contains("(number 16: ioctl request 0x8090ae81 on descriptor "),
            "{cpus} vCPUs: {}",
            f.stderr
        );
        assert!(!f.stdout.contains("RAN"), "the guest ran: {}", f.stdout);
    }
    let f = run("2", "kill");
    assert_eq!(f.status.signal(), Some(libc::SIGSYS), "{}", f.stderr);
    let f = run("2", "log");
    expect_status(&f, 0xb);
    assert!(f.stdout.contains("RAN"), "{}", f.stdout);
}

/// Issue 22: once the VM is built, TAP requests (TUNSETOFFLOAD, TUNSETVNETHDRSZ,
/// TUNSETQUEUE) are held to the VM's TAP queues. The `tap-foreign-fd` self-test has the
/// first vCPU thread, before the guest runs, set no offloads on the VM's TAP (let
/// through) and then on standard input: that VMM ends with status 148 and a report
/// naming TUNSETOFFLOAD and descriptor 0 (`--seccomp kill`: SIGSYS), while `--seccomp
/// log` lets both through and the guest runs to its end.
#[test]
fn a_tap_request_on_another_descriptor_ends_that_vmm() {
    use std::os::unix::process::ExitStatusExt;
    let ns = NetNs::new("tapfd");
    let code = assemble64(|a, lib| {
        lib.print(a, "RAN\n")?;
        debug_exit(a, 0x5)
    });
    let dir = TempDir::new("tapfd");
    let k = dir.file("kernel.elf", &linux64_elf(&code));
    let run = |mode: &str| {
        run_with_timeout(
            ns.exec()
                .arg(env!("CARGO_BIN_EXE_vessel"))
                .args(["run", "--accel", "kvm", "--memory", MEM, "--cpus", "2"])
                .args(["--seccomp", mode, "--kernel"])
                .arg(&k)
                .args(["--net", "tap=vtapfd0"])
                .env("VESSEL_SECCOMP_SELFTEST", "tap-foreign-fd"),
            Duration::from_secs(60),
        )
    };
    // TUNSETOFFLOAD is 0x400454d0.
    let f = run("trap");
    expect_status(&f, 148);
    assert!(
        f.stderr.contains("TUNSETOFFLOAD on a TAP queue")
            && f.stderr.contains("a vcpu thread (vcpu")
            && f.stderr
                .contains("(number 16: ioctl request 0x400454d0 on descriptor 0)"),
        "{}",
        f.stderr
    );
    assert_eq!(
        f.stderr.matches("the request was let through").count(),
        1,
        "the TAP's own request is let through: {}",
        f.stderr
    );
    assert!(!f.stdout.contains("RAN"), "the guest ran: {}", f.stdout);
    let f = run("kill");
    assert_eq!(f.status.signal(), Some(libc::SIGSYS), "{}", f.stderr);
    let f = run("log");
    expect_status(&f, 0xb);
    assert!(f.stdout.contains("RAN"), "{}", f.stdout);
    assert_eq!(
        f.stderr.matches("the request was let through").count(),
        2,
        "{}",
        f.stderr
    );
}
