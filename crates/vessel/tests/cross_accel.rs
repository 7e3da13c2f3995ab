//! Issue #17's cross-accelerator moves with the generated CPL3 guests a PVM host can run
//! under kvm: a small kernel (IDT, user segments, SSE on) drops to ring 3, where a loop
//! keeps a step counter, writes a 1 MiB region over and over and keeps a running
//! checksum of it (in a register and, with SSE, in XMM0). Every 16 Ki steps it re-sums
//! the whole region and reports through a privileged instruction's #GP (PVM neither
//! honours IOPL for port I/O at CPL3 nor delivers `int n` from there), whose CPL0 handler
//! prints "count N sum S full F sse X mxcsr M" and returns to ring 3. MXCSR is set to round
//! upward at the start, so a lost MXCSR shows as well as a lost XMM register.
//!
//! The guest moves emu → kvm → emu by snapshot and restore and by live migration; the
//! reports must go on without a gap or repeat and every checksum must be the one the
//! test computes for that step. These need this machine's /dev/kvm (a PVM host); without
//! it they fail and say so.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest::*;
use common::{api, chain_step_args, vessel, Guarded, TempDir};
use iced_x86::code_asm::*;

const CMD: Duration = Duration::from_secs(60);

const REGION: u64 = 0x200_0000;
/// Qwords in the region (1 MiB).
const SLOTS: u64 = 1 << 17;
const STEPS: u32 = 1 << 14;
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
const GDT: u64 = 0x3000;
const GDTR: u64 = 0x3100;
const USER_STACK: u64 = 0x5ff0;
/// The reset value with rounding toward +infinity.
const MXCSR: u32 = 0x5f80;

/// The LAPIC's registers (xAPIC MMIO).
const LAPIC: u64 = 0xfee0_0000;
const TIMER_VECTOR: u8 = 0x40;
/// 1 ms at the LAPIC timer's 1 GHz.
const TIMER_COUNT: u32 = 1_000_000;
/// Where the timer's interrupt handler counts.
const TICKS: u64 = 0x5800;

/// The guest: the kernel part, then ring 3's loop; with `timer`, a periodic LAPIC timer
/// interrupts ring 3 every millisecond and its handler counts.
fn cpl3_guest(timer: bool) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    build(&mut a, &lib, timer).unwrap();
    lib.emit(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

fn build(a: &mut CodeAssembler, lib: &Lib64, timer: bool) -> Result<(), IcedError> {
    install_exception_handlers(a, lib)?;
    let mut gp = a.create_label();
    set_idt_gate(a, 13, gp)?;
    let mut tick = a.create_label();
    if timer {
        set_idt_gate(a, TIMER_VECTOR, tick)?;
        a.mov(rdi, LAPIC)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?; // SVR: enabled
        a.mov(dword_ptr(rdi + 0x3e0), 0xb)?; // divide by 1
        a.mov(dword_ptr(rdi + 0x320), u32::from(TIMER_VECTOR) | 1 << 17)?; // periodic
        a.mov(dword_ptr(rdi + 0x380), TIMER_COUNT)?;
    }
    // SSE for ring 3 (CR4.OSFXSR, OSXMMEXCPT); no XSAVE, which is not carried across.
    a.mov(rax, cr4)?;
    a.or(rax, 0x600)?;
    a.mov(cr4, rax)?;
    // Null, (unused), kernel code at 0x10 (where the boot GDT and the IDT gates have
    // it), kernel data, user data, user code. User data takes the boot TSS's slot: TR
    // keeps the descriptor it loaded at boot.
    a.mov(rdi, GDT)?;
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
    a.xor(r12d, r12d)?; // steps taken
    a.xor(r13d, r13d)?; // reports made
    a.xor(ebp, ebp)?; // running checksum
    let mut user = a.create_label();
    a.push(0x23)?; // SS: user data | RPL 3
    a.push(USER_STACK as i32)?;
    a.push(if timer { 0x202 } else { 0x2 })?; // RFLAGS: IF with the timer
    a.push(0x2b)?; // CS: user code | RPL 3
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;

    // Ring 3.
    a.set_label(&mut user)?;
    a.pxor(xmm0, xmm0)?;
    // Rounding up instead of to nearest: MXCSR must move with the rest.
    a.mov(dword_ptr(rsp - 8), MXCSR)?;
    a.ldmxcsr(dword_ptr(rsp - 8))?;
    let mut top = a.create_label();
    let mut step = a.create_label();
    let mut sum = a.create_label();
    a.set_label(&mut top)?;
    a.mov(ecx, STEPS)?;
    a.set_label(&mut step)?;
    a.inc(r12)?;
    a.mov(rax, r12)?;
    a.mov(rdx, MIX)?;
    a.imul_2(rax, rdx)?;
    a.mov(rdx, r12)?;
    a.and(edx, (SLOTS - 1) as u32)?;
    a.mov(rsi, REGION)?;
    a.lea(rdx, ptr(rsi + rdx * 8))?;
    a.mov(rsi, qword_ptr(rdx))?;
    a.mov(qword_ptr(rdx), rax)?;
    a.sub(rax, rsi)?;
    a.add(rbp, rax)?;
    a.movq(xmm1, rax)?;
    a.paddq(xmm0, xmm1)?;
    a.dec(ecx)?;
    a.jnz(step)?;
    // The whole region, summed again from memory.
    a.xor(r14d, r14d)?;
    a.mov(rsi, REGION)?;
    a.mov(ecx, SLOTS as u32)?;
    a.set_label(&mut sum)?;
    a.add(r14, qword_ptr(rsi))?;
    a.add(rsi, 8)?;
    a.dec(ecx)?;
    a.jnz(sum)?;
    a.inc(r13)?;
    a.movq(r15, xmm0)?;
    a.stmxcsr(dword_ptr(rsp - 8))?;
    a.mov(edi, dword_ptr(rsp - 8))?;
    a.hlt()?; // #GP: the kernel reports
    a.jmp(top)?;

    // #GP: a report from ring 3's HLT; anything else is a fault.
    let mut fault = a.create_label();
    a.set_label(&mut gp)?;
    a.cmp(qword_ptr(rsp + 16), 0x2b)?;
    a.jne(fault)?;
    a.push(rax)?;
    lib.print(a, "count ")?;
    a.mov(rax, r13)?;
    a.call(lib.puthex)?;
    lib.print(a, " sum ")?;
    a.mov(rax, rbp)?;
    a.call(lib.puthex)?;
    lib.print(a, " full ")?;
    a.mov(rax, r14)?;
    a.call(lib.puthex)?;
    lib.print(a, " sse ")?;
    a.mov(rax, r15)?;
    a.call(lib.puthex)?;
    lib.print(a, " mxcsr ")?;
    a.mov(rax, rdi)?;
    a.call(lib.puthex)?;
    lib.print(a, " ticks ")?;
    a.mov(rax, TICKS)?;
    a.mov(rax, qword_ptr(rax))?;
    a.call(lib.puthex)?;
    lib.print(a, "\n")?;
    a.pop(rax)?;
    a.add(rsp, 8)?; // the error code
    a.add(qword_ptr(rsp), 1)?; // past the HLT
    a.iretq()?;
    a.set_label(&mut fault)?;
    lib.print(a, "GP outside the report\n")?;
    debug_exit(a, 0x7e)?;

    // The timer: count, EOI.
    a.set_label(&mut tick)?;
    a.push(rax)?;
    a.mov(rax, TICKS)?;
    a.inc(qword_ptr(rax))?;
    a.mov(rax, LAPIC + 0xb0)?;
    a.mov(dword_ptr(rax), 0)?;
    a.pop(rax)?;
    a.iretq()
}

/// One report: (count, sum, full, sse, mxcsr, ticks).
type Report = (u64, u64, u64, u64, u64, u64);

/// The reports in `text`, whole lines only.
fn reports(text: &str) -> Vec<Report> {
    text.split("count ")
        .skip(1)
        .filter_map(|t| {
            let line = t.split('\n').next()?;
            t.get(line.len()..)?.starts_with('\n').then_some(())?;
            let f: Vec<&str> = line.split(' ').collect();
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            match f.as_slice() {
                [n, "sum", s, "full", x, "sse", v, "mxcsr", m, "ticks", k] if n.len() == 16 => {
                    Some((hex(n)?, hex(s)?, hex(x)?, hex(v)?, hex(m)?, hex(k)?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The checksum the guest must report after `count` reports, for every count up to `n`.
fn expected_sums(n: u64) -> Vec<u64> {
    let mut region = vec![0u64; SLOTS as usize];
    let mut sum = 0u64;
    let mut c = 0u64;
    (0..n)
        .map(|_| {
            for _ in 0..STEPS {
                c += 1;
                let v = c.wrapping_mul(MIX);
                let slot = &mut region[(c & (SLOTS - 1)) as usize];
                sum = sum.wrapping_add(v.wrapping_sub(*slot));
                *slot = v;
            }
            sum
        })
        .collect()
}

/// The reports of all the VMMs the guest ran in, in order: counts go up by one from 1,
/// and every checksum (running, re-summed from memory, and SSE's) is the computed one.
fn assert_goes_on(text: &str, at_least: u64) {
    let all = reports(text);
    let counts: Vec<u64> = all.iter().map(|r| r.0).collect();
    assert!(
        counts.len() as u64 >= at_least
            && counts.first() == Some(&1)
            && counts.windows(2).all(|w| w[1] == w[0] + 1),
        "reports lost or repeated across the moves: {counts:?}"
    );
    let want = expected_sums(counts.len() as u64);
    for (r, w) in all.iter().zip(&want) {
        assert_eq!(
            (r.1, r.2, r.3, r.4),
            (*w, *w, *w, u64::from(MXCSR)),
            "report {} has a wrong checksum (sum, full, sse) or MXCSR",
            r.0
        );
    }
}

/// A VMM with its console on a pipe and its stderr kept.
struct Vmm {
    child: Guarded,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Vmm {
    fn spawn(args: &[&std::ffi::OsStr]) -> Vmm {
        let mut child = vessel()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Vmm {
            child: Guarded(child),
            out,
            reader: Some(reader),
        }
    }

    /// Everything the VMM printed, once it has ended: a line it was printing when its
    /// VM stopped ends in the next VMM's output.
    fn all_text(&mut self) -> String {
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.text()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Waits until the guest's reports in `before` and this VMM reach `count`.
    fn wait_for_count(&mut self, before: &str, count: u64) {
        let t0 = Instant::now();
        loop {
            let text = format!("{before}{}", self.text());
            if reports(&text).last().is_some_and(|r| r.0 >= count) {
                return;
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                let err = self.stderr();
                panic!("the VMM exited ({status}) before report {count}:\n{text}\n{err}");
            }
            assert!(
                t0.elapsed() < CMD,
                "no report {count} within {CMD:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM to end after sending its VM away; returns its stderr.
    fn wait_sent(&mut self) -> String {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < CMD, "the source VMM did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr();
        assert_eq!(status.code(), Some(0), "{err}");
        err
    }
}

/// Whether process `pid` holds a KVM VM (an open `anon_inode:kvm-vm`).
fn holds_a_kvm_vm(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy() == "anon_inode:kvm-vm")
}

/// The guest's kernel and a configuration that boots it under emu with no CPU feature
/// this host's KVM lacks (a CPU template of what both offer, as between two hosts). PVM's
/// KVM shows no SSE3..AVX and no leaf 7 extensions, so the template keeps the x86-64
/// baseline: of leaf 1 ECX only CMPXCHG16B, x2APIC, TSC-deadline and the hypervisor bit,
/// nothing of leaf 7, of leaf 0x80000001 ECX only LAHF/SAHF, and no 1 GiB pages or RDTSCP.
fn guest_files(dir: &TempDir, timer: bool) -> PathBuf {
    let kernel = dir.file("cpl3.elf", &linux64_elf(&cpl3_guest(timer)));
    let keep_l1_ecx: u32 = (1 << 13) | (1 << 21) | (1 << 24) | (1 << 31);
    let clear = |leaf: u32, register: u8, clear: u32| {
        format!(
            r#"{{"leaf": {leaf}, "subleaf": 0, "register": {register}, "set": 0, "clear": {clear}}}"#
        )
    };
    let mods = [
        clear(1, 2, !keep_l1_ecx),
        clear(7, 1, u32::MAX),
        clear(7, 2, u32::MAX),
        clear(7, 3, u32::MAX),
        clear(0x8000_0001, 2, !1),
        clear(0x8000_0001, 3, (1 << 26) | (1 << 27)),
    ];
    dir.file(
        "vm.json",
        format!(
            r#"{{"kernel": "{}", "memory_mib": 64, "accel": "emu", "serial": {{"type": "stdio"}},
                "cpuid_modifiers": [{}]}}"#,
            kernel.display(),
            mods.join(", ")
        )
        .as_bytes(),
    )
}

fn assert_taken_under(snap: &Path, accel: &str) {
    let state = std::fs::read(snap.join("vmstate")).unwrap();
    let tag = format!("\"accel\":\"{accel}\"");
    assert!(
        state.windows(tag.len()).any(|w| w == tag.as_bytes()),
        "{}: not taken under {accel}",
        snap.display()
    );
}

/// Snapshot under emu → restore under kvm → snapshot → restore under emu, and so on:
/// `VESSEL_CROSS_CYCLES` VMMs in all (default 4), each restored under the other
/// accelerator from the snapshot the previous one took.
#[test]
fn a_cpl3_guest_goes_on_across_accelerators_by_snapshot() {
    snapshot_chain(false, cycles());
}

fn cycles() -> usize {
    std::env::var("VESSEL_CROSS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The same with the guest's LAPIC timer running (`VESSEL_CROSS_CYCLES` too): each
/// VMM's LAPIC goes on from the previous one's (registers, vectors pending or in
/// service, the count left), so the timer keeps interrupting ring 3 after every move.
#[test]
fn a_cpl3_guest_with_a_lapic_timer_goes_on_across_accelerators_by_snapshot() {
    snapshot_chain(true, cycles());
}

fn snapshot_chain(timer: bool, cycles: usize) {
    let dir = TempDir::new("cross-snap");
    let config = guest_files(&dir, timer);
    let mut all = String::new();
    let mut from: Option<PathBuf> = None;
    let t0 = Instant::now();
    for step in 0..cycles.max(2) {
        let accel = ["emu", "kvm"][step % 2];
        let sock = dir.path().join(format!("api{step}.sock"));
        let args = chain_step_args(&sock, &config, from.as_deref(), accel);
        let mut vm = Vmm::spawn(&args);
        let next = reports(&all).last().map_or(0, |r| r.0) + 30;
        vm.wait_for_count(&all, next);
        // Only the snapshot the next VMM restores is kept.
        if let Some(old) = &from {
            std::fs::remove_dir_all(old).unwrap();
        }
        let snap = dir.path().join(format!("snap{step}"));
        std::fs::create_dir_all(&snap).unwrap();
        let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(s, 204, "{v}");
        let create = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.join("vmstate").display(),
            snap.join("memory").display()
        );
        let (s, v) = api(&sock, "PUT", "/snapshot/create", Some(&create));
        assert_eq!(s, 204, "{v}");
        vm.child.0.kill().unwrap();
        vm.child.0.wait().unwrap();
        let own = vm.all_text();
        if timer {
            assert_ticking(&own, accel);
        }
        all.push_str(&own);
        assert_taken_under(&snap, accel);
        from = Some(snap);
    }
    eprintln!(
        "{} VMMs, alternating emu and kvm, in {:?}",
        cycles.max(2),
        t0.elapsed()
    );
    assert_goes_on(&all, 30 * cycles.max(2) as u64);
}

/// Live migration emu → kvm → emu, each destination a `vessel run --incoming --accel`
/// of the other accelerator.
#[test]
fn a_cpl3_guest_goes_on_across_accelerators_by_live_migration() {
    migration_chain(false);
}

/// The same with the guest's LAPIC timer running.
#[test]
fn a_cpl3_guest_with_a_lapic_timer_goes_on_across_accelerators_by_live_migration() {
    migration_chain(true);
}

fn migration_chain(timer: bool) {
    let dir = TempDir::new("cross-mig");
    let config = guest_files(&dir, timer);
    let sock0 = dir.path().join("api0.sock");
    let mut source = Vmm::spawn(&[
        "run".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--api-sock".as_ref(),
        sock0.as_os_str(),
    ]);
    source.wait_for_count("", 30);
    let mut all = String::new();
    let mut source_sock = sock0;
    for (step, accel) in ["kvm", "emu"].into_iter().enumerate() {
        let incoming = dir.path().join(format!("in{step}.sock"));
        let sock = dir.path().join(format!("api{}.sock", step + 1));
        let mut dest = Vmm::spawn(&[
            "run".as_ref(),
            "--accel".as_ref(),
            accel.as_ref(),
            "--serial".as_ref(),
            "stdio".as_ref(),
            "--incoming".as_ref(),
            format!("unix:{}", incoming.display()).as_ref(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
        ]);
        common::wait_for_socket(&incoming, CMD);
        let body = format!(r#"{{"destination_url": "unix:{}"}}"#, incoming.display());
        let (s, v) = api(&source_sock, "PUT", "/migration/send", Some(&body));
        assert_eq!(s, 200, "step {step} to {accel}: {v}");
        eprintln!("migrated to {accel}: {v}");
        let err = source.wait_sent();
        assert!(err.contains("migrated"), "{err}");
        let own = source.all_text();
        if timer {
            assert_ticking(&own, "the source");
        }
        all.push_str(&own);
        let next = reports(&all).last().map_or(0, |r| r.0) + 30;
        dest.wait_for_count(&all, next);
        assert_eq!(
            holds_a_kvm_vm(dest.child.0.id()),
            accel == "kvm",
            "the destination does not run the VM under {accel}"
        );
        source = dest;
        source_sock = sock;
    }
    source.child.0.kill().unwrap();
    source.child.0.wait().unwrap();
    let own = source.all_text();
    if timer {
        assert_ticking(&own, "the last destination");
    }
    all.push_str(&own);
    assert_goes_on(&all, 90);
}

/// The timer interrupted ring 3 while this VMM ran the guest: its reports' tick counts
/// grew.
fn assert_ticking(own: &str, who: &str) {
    let r = reports(own);
    let (first, last) = (r.first().map(|r| r.5), r.last().map(|r| r.5));
    assert!(
        matches!((first, last), (Some(a), Some(b)) if b > a),
        "no timer interrupts under {who}: ticks {first:?} → {last:?}"
    );
}
