//! `--accel hybrid` (issue #21): a generated guest with a small 64-bit kernel (paging, IDT,
//! SYSCALL entry, PIT timer through the 8259) whose user program runs a long loop, makes
//! system calls, takes page faults the kernel resolves, has a page unmapped and one
//! write-protected under it, and reports through the kernel to the serial port. The same
//! kernel runs under `--accel emu` and `--accel hybrid`: the reports must be identical,
//! and hybrid must run the loop much faster (its user code runs natively on KVM).
//!
//! These need this machine's /dev/kvm (a PVM host); without it they fail and say so.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use iced_x86::code_asm::*;

// Guest physical layout (the boot page tables identity-map 4 GiB with U/S set).
const GDT: u64 = 0x3000;
const GDTR: u64 = 0x3100;
/// The boot page tables' PML4 (arch::layout::PML4_START).
const BOOT_PML4: u64 = 0x9000;
const SYSCALL_STACK: u64 = 0x6f00;
const VARS: u64 = 0x80_0000;
const TICKS: u64 = VARS;
const PF_COUNT: u64 = VARS + 8;
const NEXT_FREE: u64 = VARS + 0x10;
const SAVED_RSP: u64 = VARS + 0x18;
/// Page tables for the demand-paged user region (PML4 slot 1).
const PDPT_X: u64 = 0x81_0000;
const PD_X: u64 = 0x81_1000;
const PT_X: u64 = 0x81_2000;
/// Frames handed out by the page-fault handler.
const FREE_FRAMES: u64 = 0x90_0000;
const USER_STACK: u64 = 0xa0_0000;
/// The demand-paged user region: nothing maps it until user code touches it.
const DEMAND: u64 = 0x80_0000_0000;
const PTE_UWP: i32 = 7;

const SYS_PRINT: u32 = 1;
const SYS_TICKS: u32 = 2;
const SYS_PF_COUNT: u32 = 3;
const SYS_EXIT: u32 = 4;
const SYS_PRINT_TICKS: u32 = 5;
const SYS_UNMAP: u32 = 6;
const SYS_WRITE_PROTECT: u32 = 7;

const LOOP_ITERATIONS: u32 = 200_000_000;
const SPIN: u32 = 20_000_000;

fn syscall(a: &mut CodeAssembler, nr: u32) -> Result<(), IcedError> {
    a.mov(eax, nr)?;
    a.syscall()
}

/// Print RDI through the kernel ("R <hex>").
fn report(a: &mut CodeAssembler) -> Result<(), IcedError> {
    syscall(a, SYS_PRINT)
}

fn report_rax(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdi, rax)?;
    report(a)
}

fn spin(a: &mut CodeAssembler, n: u32) -> Result<(), IcedError> {
    a.mov(ecx, n)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.dec(rcx)?;
    a.jnz(l)
}

fn kernel() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    build(&mut a, &lib).unwrap();
    lib.emit(&mut a).unwrap();
    linux64_elf(&a.assemble(LOAD).unwrap())
}

/// SSE/AVX on, a GDT in Linux's layout, SYSCALL pointed at `syscall_entry`.
fn cpu_init(a: &mut CodeAssembler, syscall_entry: CodeLabel) -> Result<(), IcedError> {
    // SSE on (CR4.OSFXSR, OSXMMEXCPT). No XSAVE: hybrid does not offer it (user code on
    // PVM runs with the host's XCR0).
    a.mov(rax, cr4)?;
    a.or(rax, 0x600)?;
    a.mov(cr4, rax)?;
    // GDT in Linux's layout: kernel CS 0x10 / DS 0x18, user DS 0x2b, user CS 0x33.
    a.mov(rdi, GDT)?;
    for (i, d) in [
        0u64,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_fb00_0000_ffff,
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
    a.mov(word_ptr(rdi), 7 * 8 - 1)?;
    a.mov(rax, GDT)?;
    a.mov(qword_ptr(rdi + 2), rax)?;
    a.lgdt(ptr(rdi))?;
    // SYSCALL: EFER.SCE, STAR (kernel CS 0x10, SYSRET base 0x23), LSTAR, SFMASK (IF TF DF).
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 1)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0081u32)?;
    a.xor(eax, eax)?;
    a.mov(edx, 0x0023_0010)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0082u32)?;
    a.lea(rax, ptr(syscall_entry))?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0084u32)?;
    a.mov(eax, 0x700)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    Ok(())
}

/// Into user mode at `user` with interrupts on.
fn enter_user(a: &mut CodeAssembler, user: CodeLabel) -> Result<(), IcedError> {
    a.push(0x2b)?;
    a.mov(rax, USER_STACK)?;
    a.push(rax)?;
    a.push(0x202)?;
    a.push(0x33)?;
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()
}

fn build(a: &mut CodeAssembler, lib: &Lib64) -> Result<(), IcedError> {
    let mut pf_handler = a.create_label();
    let mut timer_handler = a.create_label();
    let mut syscall_entry = a.create_label();
    let mut user = a.create_label();

    // --- Kernel initialisation (CPL0, on x86emu in both modes). ---
    install_exception_handlers(a, lib)?;
    set_idt_gate(a, 14, pf_handler)?;
    set_idt_gate(a, 0x20, timer_handler)?;
    cpu_init(a, syscall_entry)?;
    // Kernel variables.
    a.mov(rdi, VARS)?;
    a.xor(eax, eax)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.mov(rax, FREE_FRAMES)?;
    a.mov(qword_ptr(rdi + 0x10), rax)?;
    // The demand region's tables: PML4[1] -> PDPT_X -> PD_X -> PT_X (PT_X empty).
    a.mov(rdi, BOOT_PML4 + 8)?;
    a.mov(rax, PDPT_X | 7)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdi, PDPT_X)?;
    a.mov(rax, PD_X | 7)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdi, PD_X)?;
    a.mov(rax, PT_X | 7)?;
    a.mov(qword_ptr(rdi), rax)?;
    // 8259s: master at vector 0x20, only IRQ0 (the PIT) unmasked; slave masked.
    for (port, v) in [
        (0x20u32, 0x11u32),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfe),
        (0xa1, 0xff),
        // PIT channel 0, mode 2, divisor 11932: 100 Hz.
        (0x43, 0x34),
        (0x40, 11932 & 0xff),
        (0x40, 11932 >> 8),
    ] {
        a.mov(al, v)?;
        a.out(port, al)?;
    }
    lib.print(a, "KERNEL UP\n")?;
    enter_user(a, user)?;

    // --- Timer interrupt: count the tick, EOI the 8259. ---
    a.set_label(&mut timer_handler)?;
    a.push(rax)?;
    a.push(rdi)?;
    a.mov(rdi, TICKS)?;
    a.inc(qword_ptr(rdi))?;
    a.mov(al, 0x20)?;
    a.out(0x20, al)?;
    a.pop(rdi)?;
    a.pop(rax)?;
    a.iretq()?;

    // --- Page fault: map a fresh frame at CR2 (not present), or copy the page to a
    // fresh writable frame (a write to a present, read-only page: copy-on-write). ---
    a.set_label(&mut pf_handler)?;
    let mut bad = a.create_label();
    let mut cow = a.create_label();
    let mut mapped = a.create_label();
    a.push(rax)?;
    a.push(rbx)?;
    a.push(rcx)?;
    a.push(rsi)?;
    a.push(rdi)?;
    a.mov(rax, cr2)?;
    a.mov(rbx, rax)?;
    a.shr(rbx, 21)?;
    a.mov(rcx, DEMAND >> 21)?;
    a.cmp(rbx, rcx)?;
    a.jne(bad)?;
    a.mov(rbx, rax)?;
    a.shr(rbx, 12)?;
    a.and(ebx, 511)?;
    // A fresh frame.
    a.mov(rdi, NEXT_FREE)?;
    a.mov(rcx, qword_ptr(rdi))?;
    a.add(qword_ptr(rdi), 0x1000)?;
    a.test(byte_ptr(rsp + 40), 1)?; // error code bit 0: the page was present
    a.jnz(cow)?;
    // Not present: the new page's first qword says which page it is.
    a.mov(qword_ptr(rcx), rbx)?;
    a.jmp(mapped)?;
    a.set_label(&mut cow)?;
    // Copy the old frame (identity-mapped) into the new one.
    a.mov(rsi, PT_X)?;
    a.mov(rsi, qword_ptr(rsi + rbx * 8))?;
    a.and(rsi, -4096)?;
    a.push(rcx)?;
    a.mov(rdi, rcx)?;
    a.mov(ecx, 512)?;
    a.rep().movsq()?;
    a.pop(rcx)?;
    a.set_label(&mut mapped)?;
    a.or(rcx, PTE_UWP)?;
    a.mov(rsi, PT_X)?;
    a.mov(qword_ptr(rsi + rbx * 8), rcx)?;
    a.invlpg(byte_ptr(rax))?;
    a.mov(rdi, PF_COUNT)?;
    a.inc(qword_ptr(rdi))?;
    a.pop(rdi)?;
    a.pop(rsi)?;
    a.pop(rcx)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.add(rsp, 8)?; // the error code
    a.iretq()?;
    a.set_label(&mut bad)?;
    lib.print(a, "BAD PF at ")?;
    a.call(lib.puthex)?;
    lib.print(a, "\n")?;
    debug_exit(a, 0x7e)?;

    // --- SYSCALL entry: own stack, RAX = number, RDI = argument. ---
    a.set_label(&mut syscall_entry)?;
    let mut ret = a.create_label();
    let cases: Vec<(u32, CodeLabel)> = [
        SYS_PRINT,
        SYS_TICKS,
        SYS_PF_COUNT,
        SYS_EXIT,
        SYS_PRINT_TICKS,
        SYS_UNMAP,
        SYS_WRITE_PROTECT,
    ]
    .iter()
    .map(|&n| (n, a.create_label()))
    .collect();
    a.mov(qword_ptr(SAVED_RSP), rsp)?;
    a.mov(rsp, SYSCALL_STACK)?;
    a.push(rcx)?;
    a.push(r11)?;
    for (n, l) in &cases {
        a.cmp(eax, *n)?;
        a.je(*l)?;
    }
    lib.print(a, "BAD SYSCALL\n")?;
    debug_exit(a, 0x7d)?;
    for (n, mut l) in cases {
        a.set_label(&mut l)?;
        match n {
            SYS_PRINT => {
                lib.print(a, "R ")?;
                a.mov(rax, rdi)?;
                a.call(lib.puthex)?;
                lib.print(a, "\n")?;
            }
            SYS_PRINT_TICKS => {
                lib.print(a, "T ")?;
                a.mov(rax, rdi)?;
                a.call(lib.puthex)?;
                lib.print(a, "\n")?;
            }
            SYS_TICKS => a.mov(rax, qword_ptr(TICKS))?,
            SYS_PF_COUNT => a.mov(rax, qword_ptr(PF_COUNT))?,
            SYS_EXIT => {
                lib.print(a, "DONE\n")?;
                debug_exit(a, 0x21)?;
            }
            SYS_UNMAP | SYS_WRITE_PROTECT => {
                // RDI: a page of the demand region; clear P or W in its PTE, INVLPG.
                a.mov(rax, rdi)?;
                a.shr(rax, 12)?;
                a.and(eax, 511)?;
                a.mov(rsi, PT_X)?;
                let bit = if n == SYS_UNMAP { !1i32 } else { !2i32 };
                a.and(qword_ptr(rsi + rax * 8), bit)?;
                a.invlpg(byte_ptr(rdi))?;
            }
            _ => unreachable!(),
        }
        a.jmp(ret)?;
    }
    a.set_label(&mut ret)?;
    a.pop(r11)?;
    a.pop(rcx)?;
    a.mov(rsp, qword_ptr(SAVED_RSP))?;
    a.sysretq()?;

    // --- User program (CPL3). ---
    a.set_label(&mut user)?;
    // CPUID as Vessel's table answers it (leaf 0x40000001: the kvmclock feature bits).
    a.mov(eax, 0x4000_0001)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    report_rax(a)?;
    // SSE state that must survive every switch.
    a.mov(rax, 0x1234_5678_9abc_def0u64)?;
    a.movq(xmm6, rax)?;
    // More SSE state: xmm13, set on x86emu, read back after native stints.
    a.movq(xmm13, rax)?;
    a.pshufd(xmm13, xmm13, 0x4e)?;
    syscall(a, SYS_TICKS)?;
    a.mov(r15, rax)?;
    // The long loop, between two markers the test times.
    a.mov(edi, 0xa1)?;
    report(a)?;
    a.mov(ecx, LOOP_ITERATIONS)?;
    a.xor(ebx, ebx)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.add(rbx, rcx)?;
    a.paddq(xmm6, xmm7)?; // xmm7 is 0: keeps SSE live in the loop
    a.dec(rcx)?;
    a.jnz(l)?;
    a.mov(r12, rbx)?;
    // CPUID again, right after the loop (natively in hybrid: CPUID faulting must hand
    // it to x86emu, or the host's answer shows).
    a.mov(eax, 0x4000_0001)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.mov(r13, rax)?;
    a.mov(edi, 0xa2)?;
    report(a)?;
    a.mov(rdi, r13)?;
    report(a)?;
    a.mov(rdi, r12)?;
    report(a)?;
    // Timer ticks counted while the loop ran.
    syscall(a, SYS_TICKS)?;
    a.sub(rax, r15)?;
    a.mov(rdi, rax)?;
    syscall(a, SYS_PRINT_TICKS)?;
    a.movq(rax, xmm6)?;
    report_rax(a)?;
    a.pshufd(xmm4, xmm13, 0x4e)?;
    a.movq(rax, xmm4)?;
    report_rax(a)?;
    // Many short system calls.
    a.xor(r14d, r14d)?;
    let mut calls = a.create_label();
    a.set_label(&mut calls)?;
    syscall(a, SYS_PF_COUNT)?;
    a.inc(r14)?;
    a.cmp(r14, 2000)?;
    a.jne(calls)?;
    a.mov(rdi, r14)?;
    report(a)?;
    // Demand paging: 8 pages, each written (faults) then summed.
    a.mov(rsi, DEMAND)?;
    a.xor(ebx, ebx)?;
    let mut touch = a.create_label();
    a.set_label(&mut touch)?;
    a.mov(rax, qword_ptr(rsi))?; // fault: the kernel maps it, first qword = page index
    a.add(rbx, rax)?;
    a.lea(rax, ptr(rax + rax * 2 + 1))?;
    a.mov(qword_ptr(rsi + 8), rax)?;
    a.add(rsi, 0x1000)?;
    a.mov(rax, DEMAND + 8 * 0x1000)?;
    a.cmp(rsi, rax)?;
    a.jne(touch)?;
    a.mov(rsi, DEMAND)?;
    for i in 0..8 {
        a.add(rbx, qword_ptr(rsi + i * 0x1000 + 8))?;
    }
    a.mov(rdi, rbx)?;
    report(a)?;
    syscall(a, SYS_PF_COUNT)?;
    report_rax(a)?;
    // Pages 3 and 5 read over and over by a long stretch of user code (natively in
    // hybrid, so KVM's shadow page tables map them).
    a.mov(ecx, SPIN)?;
    let mut reread = a.create_label();
    a.set_label(&mut reread)?;
    a.mov(rax, qword_ptr(rsi + 3 * 0x1000 + 8))?;
    a.add(rax, qword_ptr(rsi + 5 * 0x1000 + 8))?;
    a.dec(rcx)?;
    a.jnz(reread)?;
    report_rax(a)?;
    // Unmap page 3 under user code; after a long stretch of user code (native in hybrid),
    // touching it must fault again and see a fresh page (first qword 3, second 0).
    a.mov(rdi, DEMAND + 3 * 0x1000)?;
    syscall(a, SYS_UNMAP)?;
    spin(a, SPIN)?;
    a.mov(rsi, DEMAND + 3 * 0x1000)?;
    a.mov(rax, qword_ptr(rsi + 8))?;
    report_rax(a)?;
    syscall(a, SYS_PF_COUNT)?;
    report_rax(a)?;
    // Write-protect page 5 (as fork does for copy-on-write); after a long stretch, a write
    // must fault, and the copy keep the old contents.
    a.mov(rdi, DEMAND + 5 * 0x1000)?;
    syscall(a, SYS_WRITE_PROTECT)?;
    spin(a, SPIN)?;
    a.mov(rsi, DEMAND + 5 * 0x1000)?;
    a.mov(qword_ptr(rsi + 16), 0x55)?;
    a.mov(rax, qword_ptr(rsi + 8))?;
    report_rax(a)?;
    a.mov(rax, qword_ptr(rsi + 16))?;
    report_rax(a)?;
    syscall(a, SYS_PF_COUNT)?;
    report_rax(a)?;
    // Code rewritten by user code: a routine's immediate changed natively in hybrid
    // (after a long stretch), then the routine called right after a system call, where
    // x86emu runs the first user instructions: it must run the new code.
    let mut smc = a.create_label();
    a.call(smc)?;
    report_rax(a)?;
    spin(a, SPIN)?;
    a.lea(rax, ptr(smc))?;
    a.mov(dword_ptr(rax + 1), 0x22)?;
    syscall(a, SYS_PF_COUNT)?;
    a.call(smc)?;
    report_rax(a)?;
    // Timer ticks while user code spins with nothing else to do.
    syscall(a, SYS_TICKS)?;
    a.mov(r15, rax)?;
    spin(a, SPIN * 5)?;
    syscall(a, SYS_TICKS)?;
    a.sub(rax, r15)?;
    a.mov(rdi, rax)?;
    syscall(a, SYS_PRINT_TICKS)?;
    syscall(a, SYS_EXIT)?;
    a.set_label(&mut smc)?;
    a.mov(eax, 0x11)?;
    a.ret()
}

struct Run {
    /// Serial output lines with the time each arrived.
    lines: Vec<(Instant, String)>,
    stderr: String,
    status: std::process::ExitStatus,
    elapsed: Duration,
}

impl Run {
    fn text(&self) -> String {
        self.lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// The report lines, without the timer tick counts (which depend on speed).
    fn reports(&self) -> Vec<String> {
        self.lines
            .iter()
            .map(|(_, l)| l.clone())
            .filter(|l| !l.starts_with("T "))
            .collect()
    }

    fn ticks(&self) -> Vec<u64> {
        self.lines
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("T "))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .collect()
    }

    fn at(&self, line: &str) -> Instant {
        self.lines
            .iter()
            .find(|(_, l)| l == line)
            .unwrap_or_else(|| panic!("no {line:?} in the output:\n{}", self.text()))
            .0
    }

    /// Time between the loop's start and end markers.
    fn loop_time(&self) -> Duration {
        self.at("R 00000000000000a2") - self.at("R 00000000000000a1")
    }
}

fn run_guest(accel: &str, kernel: &std::path::Path) -> Run {
    let start = Instant::now();
    let child = vessel()
        .args([
            "run", "--accel", accel, "--memory", "64M", "--serial", "stdio",
        ])
        .arg("--kernel")
        .arg(kernel)
        .env("VESSEL_LOG", "emu::hybrid=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut g = Guarded(child);
    let out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .map(|l| (Instant::now(), l.trim_end_matches('\r').to_string()))
            .collect::<Vec<_>>()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(120);
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = g.0.kill();
            let _ = g.0.wait();
            panic!(
                "--accel {accel}: no exit within {limit:?}; stderr:\n{}",
                t_err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        lines: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        status,
        elapsed: start.elapsed(),
    }
}

fn stat(stderr: &str, key: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("hybrid vCPU statistics"))?;
    let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
    rest.split_whitespace().next()?.parse().ok()
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("--accel hybrid needs /dev/kvm (a PVM host on this project's machines): {e}");
    }
}

#[test]
fn hybrid_runs_user_code_natively_with_the_same_results_as_emu() {
    require_kvm();
    let dir = TempDir::new("hybrid");
    let k = dir.file("kernel.elf", &kernel());
    let emu = run_guest("emu", &k);
    let hybrid = run_guest("hybrid", &k);
    for (name, r) in [("emu", &emu), ("hybrid", &hybrid)] {
        assert_eq!(
            r.status.code(),
            Some((0x21 << 1) | 1),
            "--accel {name}: output:\n{}\nstderr:\n{}",
            r.text(),
            r.stderr
        );
    }
    let sum: u64 = (1..=u64::from(LOOP_ITERATIONS)).sum();
    // Each demand page i: first qword i (from the kernel), second 3i+1 (from user code).
    let pages: u64 = (0..8u64).map(|i| i + 3 * i + 1).sum();
    let want = [
        "KERNEL UP".to_string(),
        "R 0000000001000009".to_string(), // Vessel's CPUID leaf 0x40000001, not the host's
        "R 00000000000000a1".to_string(),
        "R 00000000000000a2".to_string(),
        "R 0000000001000009".to_string(), // the same leaf, asked from native user code
        format!("R {sum:016x}"),
        "R 123456789abcdef0".to_string(), // xmm6 survived
        "R 123456789abcdef0".to_string(), // xmm13's upper half survived
        format!("R {:016x}", 2000),
        format!("R {pages:016x}"),
        "R 0000000000000008".to_string(), // 8 page faults
        format!("R {:016x}", 10 + 16),    // pages 3 and 5, read natively
        "R 0000000000000000".to_string(), // the unmapped page came back fresh
        "R 0000000000000009".to_string(), // ... through a 9th fault
        "R 0000000000000010".to_string(), // the COW copy kept 3*5+1
        "R 0000000000000055".to_string(), // and took the write
        "R 000000000000000a".to_string(), // ... through a 10th fault
        "R 0000000000000011".to_string(), // the routine as first written
        "R 0000000000000022".to_string(), // ... and as user code rewrote it
        "DONE".to_string(),
    ];
    assert_eq!(emu.reports(), want, "emu output:\n{}", emu.text());
    assert_eq!(
        hybrid.reports(),
        emu.reports(),
        "hybrid output differs from emu:\n{}\nstderr:\n{}",
        hybrid.text(),
        hybrid.stderr
    );
    let (te, th) = (emu.loop_time(), hybrid.loop_time());
    let stints = stat(&hybrid.stderr, "stints").unwrap_or(0.0);
    eprintln!(
        "200M-iteration user loop: emu {te:?}, hybrid {th:?} ({:.1}x); whole run: emu {:?}, \
         hybrid {:?}; ticks during the loop / spin: emu {:?}, hybrid {:?}",
        te.as_secs_f64() / th.as_secs_f64(),
        emu.elapsed,
        hybrid.elapsed,
        emu.ticks(),
        hybrid.ticks()
    );
    eprintln!(
        "hybrid statistics: {}",
        hybrid
            .stderr
            .lines()
            .find(|l| l.contains("hybrid vCPU statistics"))
            .unwrap_or("(none)")
    );
    assert!(stints > 0.0, "no native stints:\n{}", hybrid.stderr);
    // The routine rewritten natively was seen through KVM's dirty log of code pages
    // (where the host has manual dirty-log protection, as PVM hosts do).
    let code_writes = stat(&hybrid.stderr, "code_writes").unwrap_or(0.0);
    assert!(
        code_writes >= 1.0,
        "the native store to code was not seen in the code log:\n{}",
        hybrid.stderr
    );
    // Whether the loop ran natively is read from the vCPU's own accounting, not from a
    // speed ratio: emu's compiled loop keeps getting faster, and CI hosts are noisy. The
    // speed itself is bench/real.sh's to report (its vessel-hybrid column).
    let native_ms = stat(&hybrid.stderr, "native_ms").unwrap_or(0.0);
    assert!(
        native_ms >= 0.5 * th.as_secs_f64() * 1e3,
        "the hybrid loop took {th:?} but only {native_ms} ms ran natively:\n{}",
        hybrid.stderr
    );
    assert!(
        te.as_secs_f64() >= 2.0 * th.as_secs_f64(),
        "hybrid loop {th:?} is not even 2x faster than emu {te:?}"
    );
    // The 100 Hz timer interrupted user code in both modes, while it ran natively too.
    for (name, r) in [("emu", &emu), ("hybrid", &hybrid)] {
        let t = r.ticks();
        assert_eq!(t.len(), 2, "{name}: {t:?}");
        assert!(t[0] >= 1, "{name}: no tick during the loop: {t:?}");
        assert!(t[1] >= 1, "{name}: no tick while spinning: {t:?}");
    }
    assert!(
        hybrid.stderr.contains("cpuid_faulting=true"),
        "KVM did not take CPUID faulting:\n{}",
        hybrid.stderr
    );
    let kicked = stat(&hybrid.stderr, "kicked_exits").unwrap_or(0.0);
    assert!(
        kicked >= 1.0,
        "no native stint ended for a timer:\n{}",
        hybrid.stderr
    );
}

const RX_COUNT: u64 = VARS + 0x20;

/// A kernel whose only interrupt is the UART's (no timer): user code spins reading the
/// kernel's count of received bytes until it reaches 3, then exits through SYSCALL.
fn rx_kernel() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    (|| -> Result<(), IcedError> {
        let a = &mut a;
        let mut rx_handler = a.create_label();
        let mut syscall_entry = a.create_label();
        let mut user = a.create_label();
        install_exception_handlers(a, &lib)?;
        set_idt_gate(a, 0x24, rx_handler)?;
        cpu_init(a, syscall_entry)?;
        a.mov(rdi, RX_COUNT)?;
        a.mov(qword_ptr(rdi), 0)?;
        for (port, v) in [
            (0x20u32, 0x11u32),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xef), // only IRQ4, the UART
            (0xa1, 0xff),
        ] {
            a.mov(al, v)?;
            a.out(port, al)?;
        }
        // UART: OUT2 (the IRQ line's gate on PCs), received-data interrupt on.
        a.mov(dx, COM1 + 4)?;
        a.mov(al, 0x0b)?;
        a.out(dx, al)?;
        a.mov(dx, COM1 + 1)?;
        a.mov(al, 1)?;
        a.out(dx, al)?;
        lib.print(a, "SPINNING\n")?;
        enter_user(a, user)?;

        // UART interrupt: drain the receiver, count the bytes, EOI.
        a.set_label(&mut rx_handler)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.push(rdi)?;
        let mut more = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut more)?;
        a.mov(dx, COM1 + 5)?;
        a.in_(al, dx)?;
        a.test(al, 1)?;
        a.jz(done)?;
        a.mov(dx, COM1)?;
        a.in_(al, dx)?;
        a.mov(rdi, RX_COUNT)?;
        a.inc(qword_ptr(rdi))?;
        a.jmp(more)?;
        a.set_label(&mut done)?;
        a.mov(al, 0x20)?;
        a.out(0x20, al)?;
        a.pop(rdi)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()?;

        // SYSCALL: print RDI and exit.
        a.set_label(&mut syscall_entry)?;
        lib.print(a, "RX ")?;
        a.mov(rax, rdi)?;
        a.call(lib.puthex)?;
        lib.print(a, "\nDONE\n")?;
        debug_exit(a, 0x21)?;

        // User code: spin until three bytes arrived.
        a.set_label(&mut user)?;
        a.nop()?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.mov(rax, qword_ptr(RX_COUNT))?;
        a.cmp(rax, 3)?;
        a.jb(spin)?;
        a.mov(rdi, rax)?;
        a.syscall()
    })()
    .unwrap();
    lib.emit(&mut a).unwrap();
    linux64_elf(&a.assemble(LOAD).unwrap())
}

/// An interrupt raised by another thread (the console's input pump) while user code runs
/// natively gets the vCPU out of KVM_RUN through the irqchip's notifier, and user code
/// sees what the kernel's handler did. The input may land between two stints (the vCPU
/// then takes it in emulation, with no kick): such a try proves nothing about the kick,
/// and the test tries again, up to three times.
#[test]
fn an_interrupt_from_another_thread_reaches_natively_running_user_code() {
    require_kvm();
    let mut last = String::new();
    for _ in 0..3 {
        match interrupt_from_another_thread_try() {
            Ok(()) => return,
            Err(stderr) => last = stderr,
        }
    }
    panic!("in three tries the UART interrupt never kicked the vCPU out of KVM_RUN:\n{last}");
}

/// One try: Err(stderr) when the input arrived with no kick (between stints).
fn interrupt_from_another_thread_try() -> Result<(), String> {
    use std::io::Write;
    let dir = TempDir::new("hybrid-rx");
    let k = dir.file("kernel.elf", &rx_kernel());
    let child = vessel()
        .args([
            "run", "--accel", "hybrid", "--memory", "64M", "--serial", "stdio",
        ])
        .arg("--kernel")
        .arg(&k)
        .env("VESSEL_LOG", "emu::hybrid=info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut g = Guarded(child);
    let mut stdin = g.0.stdin.take().unwrap();
    let out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut lines = Vec::new();
    let wait_for = |want: &str, lines: &mut Vec<String>| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                let done = l.trim_end() == want;
                lines.push(l);
                if done {
                    return true;
                }
            }
        }
        false
    };
    assert!(wait_for("SPINNING", &mut lines), "no SPINNING: {lines:?}");
    // Let user code settle on the KVM vCPU, then type.
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    stdin.write_all(b"abc").unwrap();
    stdin.flush().unwrap();
    let done = wait_for("DONE", &mut lines);
    let latency = sent.elapsed();
    let _ = g.0.wait();
    let stderr = t_err.join().unwrap();
    assert!(done, "no DONE: {lines:?}\nstderr:\n{stderr}");
    assert!(
        lines.iter().any(|l| l.trim_end() == "RX 0000000000000003"),
        "{lines:?}"
    );
    let kicks = stat(&stderr, "kicks").unwrap_or(0.0);
    let stints = stat(&stderr, "stints").unwrap_or(0.0);
    eprintln!("input to DONE in {latency:?}; stints {stints}, kicks {kicks}");
    assert!(stints >= 1.0, "user code never ran natively:\n{stderr}");
    if kicks >= 1.0 {
        Ok(())
    } else {
        Err(stderr)
    }
}
