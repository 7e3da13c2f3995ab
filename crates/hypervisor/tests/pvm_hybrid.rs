//! Feasibility probes for issue #21's hybrid accelerator (guest kernel on x86emu, guest
//! user code on a KVM vCPU) on this machine's PVM `/dev/kvm`.
//!
//! Every test builds a tiny guest by hand: 4-level page tables in guest memory that map a
//! few user pages (U/S=1), and a vCPU put straight into 64-bit user mode with
//! KVM_SET_SREGS/KVM_SET_REGS — no CPL0 code runs at all. The user code is assembled with
//! iced-x86. Each test states a finding as an assertion and prints what it measured.
//!
//! These need the real `/dev/kvm`; without it they fail and say so.
//!
//! What they found (kernel 6.18 PVM host, 2-core machine):
//! - PVM accepts a vCPU set up directly at CPL3 (CS 0x33/SS 0x2b, DPL 3, before its first
//!   run). Without PVM's own MSRs (MSR_PVM_VCPU_STRUCT …) every event that would enter the
//!   guest kernel — SYSCALL, #PF, #GP, #UD, #DE, int3, `int n` — ends KVM_RUN with
//!   KVM_EXIT_SHUTDOWN, leaving the user state in place; the vCPU can be re-entered at once.
//! - Each switch is expensive: ~5 µs per vCPU ioctl, ~47 µs per KVM_RUN that enters the guest,
//!   ~77 µs for a full state round trip; a signal kick takes ~40 µs.
//! - Host writes to guest page tables are not seen until a memslot is deleted and re-added
//!   (everything) or the old target data page's host mapping is invalidated (mprotect or
//!   MADV_DONTNEED: MMU notifiers); permission upgrades are seen without any action.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_xsave, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

// Guest physical layout (identity-mapped for the pages user code touches).
const MEM_SIZE: usize = 4 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// The page table for VA 0..2 MiB.
const PT: u64 = 0x4000;
/// A second page table (used by the "PDE switched" case), and the alternative PML4.
const PT2: u64 = 0x5000;
const PML4_ALT: u64 = 0x6000;
const CODE: u64 = 0x10000;
const STACK_TOP: u64 = 0x30000;
/// Scratch data page user code may write its results to.
const SCRATCH: u64 = 0x38000;
const PAGE_A: u64 = 0x40000;
const PAGE_B: u64 = 0x41000;
/// The virtual address whose PTE the coherence tests rewrite; maps PAGE_A at first.
const VA_X: u64 = 0x10_0000;
/// Never mapped.
const VA_UNMAPPED: u64 = 0x18_0000;

const PTE_P: u64 = 1;
const PTE_W: u64 = 2;
const PTE_U: u64 = 4;
const PTE_A: u64 = 0x20;
const PTE_D: u64 = 0x40;
const PTE_UWP: u64 = PTE_P | PTE_W | PTE_U;

const USER_CS: u16 = 0x33;
const USER_SS: u16 = 0x2b;

fn open_kvm() -> Kvm {
    match Kvm::new() {
        Ok(k) => k,
        Err(e) => panic!(
            "these probes need the real /dev/kvm (a PVM host on this project's machines) and \
             cannot open it: {e}"
        ),
    }
}

/// What KVM_RUN ended with, owned.
#[derive(Debug, Clone, PartialEq)]
enum Exit {
    Shutdown,
    Hlt,
    IoIn(u16),
    IoOut(u16),
    Mmio(u64),
    InternalError(u32),
    FailEntry(u64),
    Intr,
    Errno(i32),
    Other(String),
}

struct Probe {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: *mut u8,
    slot_flags: u32,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: `mem` is the MEM_SIZE mapping made in `new`, unmapped once, here.
        unsafe {
            libc::munmap(self.mem.cast(), MEM_SIZE);
        }
    }
}

impl Probe {
    /// A VM with MEM_SIZE bytes of guest memory at GPA 0 (shared anonymous memory, so
    /// MADV_DONTNEED keeps its contents), page tables mapping the user pages, and one vCPU
    /// in 64-bit user mode at `CODE`.
    fn new() -> Probe {
        let kvm = open_kvm();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        // SAFETY: a fresh anonymous mapping; checked against MAP_FAILED below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
        let mut p = Probe {
            vcpu: vm.create_vcpu(0).expect("KVM_CREATE_VCPU"),
            kvm,
            vm,
            mem: mem.cast(),
            slot_flags: 0,
        };
        p.set_slot(MEM_SIZE as u64, 0);
        let cpuid = p
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        p.vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        p.build_page_tables();
        p.enter_user(CODE);
        p
    }

    fn set_slot(&mut self, size: u64, flags: u32) {
        self.slot_flags = flags;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: self.mem as u64,
        };
        // SAFETY: `mem` is a live MEM_SIZE mapping owned by this probe, outliving the VM.
        unsafe { self.vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_SIZE);
        // SAFETY: in bounds of the guest memory mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mem.add(gpa as usize), bytes.len())
        }
    }

    fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        assert!(gpa as usize + 8 <= MEM_SIZE);
        // SAFETY: in bounds of the guest memory mapping (checked above).
        unsafe { std::ptr::read_unaligned(self.mem.add(gpa as usize).cast::<u64>()) }
    }

    fn fill(&self, gpa: u64, pattern: u64) {
        for i in 0..512 {
            self.write_u64(gpa + i * 8, pattern);
        }
    }

    fn pte_addr(va: u64) -> u64 {
        assert!(va < 0x20_0000);
        PT + (va >> 12) * 8
    }

    fn set_pte(&self, va: u64, v: u64) {
        self.write_u64(Self::pte_addr(va), v);
    }

    fn build_page_tables(&self) {
        self.write_u64(PML4, PDPT | PTE_UWP);
        self.write_u64(PDPT, PD | PTE_UWP);
        self.write_u64(PD, PT | PTE_UWP);
        // An alternative root that maps the same tables.
        self.write_u64(PML4_ALT, PDPT | PTE_UWP);
        // Code, stack and scratch pages, identity mapped.
        let mut va = CODE;
        while va < SCRATCH + 0x1000 {
            self.set_pte(va, va | PTE_UWP);
            va += 0x1000;
        }
        self.fill(PAGE_A, 0xaaaa_aaaa_aaaa_aaaa);
        self.fill(PAGE_B, 0xbbbb_bbbb_bbbb_bbbb);
        self.set_pte(VA_X, PAGE_A | PTE_UWP);
    }

    fn user_sregs(&self) -> kvm_sregs {
        let mut s = self.vcpu.get_sregs().expect("KVM_GET_SREGS");
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CS,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: USER_SS,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        let null = kvm_segment {
            selector: 0,
            ..data
        };
        s.cs = code;
        s.ss = data;
        s.ds = null;
        s.es = null;
        s.fs = null;
        s.gs = null;
        s.tr = kvm_segment {
            selector: 0x40,
            type_: 0xb,
            s: 0,
            db: 0,
            limit: 0x67,
            g: 0,
            ..data
        };
        s.cr0 = 0x8000_0000 | 0x1_0000 | 0x20 | 0x10 | 0x2 | 0x1; // PG WP NE ET MP PE
        s.cr3 = PML4;
        s.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE OSFXSR OSXMMEXCPT
        s.efer = (1 << 8) | (1 << 10) | (1 << 11); // LME LMA NXE; SCE off
        s.idt.base = 0;
        s.idt.limit = 0;
        s.gdt.base = 0;
        s.gdt.limit = 0;
        s
    }

    fn enter_user(&mut self, rip: u64) {
        let s = self.user_sregs();
        self.vcpu.set_sregs(&s).expect("KVM_SET_SREGS");
        self.set_rip(rip);
    }

    fn set_rip(&mut self, rip: u64) {
        let regs = kvm_regs {
            rip,
            rsp: STACK_TOP - 8,
            rflags: 0x202,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    }

    /// Assemble `body` at `CODE` into guest memory; returns the addresses of its labels.
    fn load(&self, body: impl FnOnce(&mut CodeAssembler, &mut Vec<CodeLabel>)) -> Vec<u64> {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut labels = Vec::new();
        body(&mut a, &mut labels);
        let r = a
            .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
        self.write(CODE, r.inner.code_buffer.as_slice());
        labels
            .iter()
            .map(|l| r.label_ip(l).unwrap())
            .collect::<Vec<_>>()
    }

    fn run(&mut self) -> Exit {
        match self.vcpu.run() {
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::IoIn(port, _)) => Exit::IoIn(port),
            Ok(VcpuExit::IoOut(port, _)) => Exit::IoOut(port),
            Ok(VcpuExit::MmioRead(a, _)) | Ok(VcpuExit::MmioWrite(a, _)) => Exit::Mmio(a),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason says the `internal` member of the union is valid.
                let sub = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Exit::InternalError(sub)
            }
            Ok(VcpuExit::FailEntry(r, _)) => Exit::FailEntry(r),
            Ok(VcpuExit::Intr) => Exit::Intr,
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) => Exit::Errno(e.errno()),
        }
    }

    fn timed_run(&mut self) -> (Exit, Duration) {
        let t = Instant::now();
        let e = self.run();
        (e, t.elapsed())
    }

    fn regs(&self) -> kvm_regs {
        self.vcpu.get_regs().expect("KVM_GET_REGS")
    }

    fn sregs(&self) -> kvm_sregs {
        self.vcpu.get_sregs().expect("KVM_GET_SREGS")
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn label(a: &mut CodeAssembler, labels: &mut Vec<CodeLabel>) -> usize {
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    labels.push(l);
    labels.len() - 1
}

/// Load marker values into registers the events must leave intact.
fn markers(a: &mut CodeAssembler) {
    a.mov(rbx, 0x1111_2222_3333_4444u64).unwrap();
    a.mov(rcx, 0x5555_6666_7777_8888u64).unwrap();
    a.mov(rdx, 0x0123_4567_89ab_cdefu64).unwrap();
    a.mov(r11, 0x7777_0000_7777_0000u64).unwrap();
    a.mov(r12, 0xfeed_face_cafe_beefu64).unwrap();
    a.mov(rsi, 0x0101_0101_0101_0101u64).unwrap();
}

fn markers_intact(r: &kvm_regs) -> Vec<&'static str> {
    let mut bad = Vec::new();
    if r.rbx != 0x1111_2222_3333_4444 {
        bad.push("rbx");
    }
    if r.rcx != 0x5555_6666_7777_8888 {
        bad.push("rcx");
    }
    if r.rdx != 0x0123_4567_89ab_cdef {
        bad.push("rdx");
    }
    if r.r11 != 0x7777_0000_7777_0000 {
        bad.push("r11");
    }
    if r.r12 != 0xfeed_face_cafe_beef {
        bad.push("r12");
    }
    if r.rsi != 0x0101_0101_0101_0101 {
        bad.push("rsi");
    }
    bad
}
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_TSC: u32 = 0x10;
/// What KVM's LSTAR holds in these probes: a SYSCALL from user mode ends KVM_RUN with RIP here.
const LSTAR_MARK: u64 = 0xdead_b000;

impl Probe {
    fn set_msr(&self, index: u32, data: u64) {
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(self.vcpu.set_msrs(&msrs).expect("KVM_SET_MSRS"), 1);
    }

    /// A probe whose SYSCALL exits are recognisable: LSTAR = LSTAR_MARK.
    fn with_lstar() -> Probe {
        let p = Probe::new();
        p.set_msr(MSR_LSTAR, LSTAR_MARK);
        p
    }

    fn xsave(&self) -> kvm_xsave {
        self.vcpu.get_xsave().expect("KVM_GET_XSAVE")
    }

    fn set_xsave(&self, x: &kvm_xsave) {
        // SAFETY: `x` is a whole kvm_xsave (4 KiB region) as the legacy ioctl expects.
        unsafe { self.vcpu.set_xsave(x) }.expect("KVM_SET_XSAVE");
    }
}

/// Where x86emu would resume after the exit, by event kind.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Resume {
    /// RIP still at the instruction (a fault): re-executing it raises the event again.
    AtInsn,
    /// RIP after the instruction (a trap).
    Next,
    /// RIP = KVM's LSTAR, RCX = the return address, R11 = RFLAGS: SYSCALL semantics.
    Syscall,
}

type Ev = fn(&mut CodeAssembler);

fn event_cases() -> Vec<(&'static str, Ev, Resume)> {
    vec![
        ("syscall", |a| a.syscall().unwrap(), Resume::Syscall),
        (
            "#PF read of an unmapped page",
            |a| a.mov(rax, qword_ptr(VA_UNMAPPED)).unwrap(),
            Resume::AtInsn,
        ),
        ("#GP hlt", |a| a.hlt().unwrap(), Resume::AtInsn),
        ("#GP cli", |a| a.cli().unwrap(), Resume::AtInsn),
        ("#GP out", |a| a.out(0x80, al).unwrap(), Resume::AtInsn),
        ("#GP rdmsr", |a| a.rdmsr().unwrap(), Resume::AtInsn),
        ("#GP mov cr3", |a| a.mov(cr3, rax).unwrap(), Resume::AtInsn),
        ("int 0x80", |a| a.int(0x80).unwrap(), Resume::AtInsn),
        ("int 0x30", |a| a.int(0x30).unwrap(), Resume::AtInsn),
        ("#BP int3", |a| a.int3().unwrap(), Resume::Next),
        ("#DE div", |a| a.div(r13d).unwrap(), Resume::AtInsn),
        ("#UD ud2", |a| a.ud2().unwrap(), Resume::AtInsn),
    ]
}

/// Q1: a vCPU entered straight into CPL3 (no CPL0 code, IDT limit 0, no PVM MSRs) ends
/// KVM_RUN with KVM_EXIT_SHUTDOWN on every event that would enter the kernel, and leaves
/// the user state in place: faults at the instruction (RFLAGS.RF set), int3 after it,
/// SYSCALL with RIP = LSTAR and RCX/R11 as the instruction defines them. The same vCPU is
/// re-entered for every case, so each case also shows that re-entry after a shutdown works.
#[test]
fn user_mode_events_end_kvm_run_with_shutdown_and_state_intact() {
    for sce in [false, true] {
        let mut p = Probe::with_lstar();
        if sce {
            let mut s = p.user_sregs();
            s.efer |= 1;
            p.vcpu.set_sregs(&s).unwrap();
        }
        for (name, ev, resume) in event_cases() {
            let l = p.load(|a, ls| {
                markers(a);
                a.xor(r13d, r13d).unwrap();
                label(a, ls);
                ev(a);
                label(a, ls);
                a.jmp(ls[0]).unwrap();
            });
            p.set_rip(CODE);
            let (exit, t) = p.timed_run();
            let r = p.regs();
            let s = p.sregs();
            eprintln!(
                "SCE={} {name:30} -> {exit:?} in {t:>9.1?}: rip={:#x} rflags={:#x} cs={:#x} \
                 dpl={} cr2={:#x} rcx={:#x} r11={:#x}",
                sce as u8, r.rip, r.rflags, s.cs.selector, s.cs.dpl, s.cr2, r.rcx, r.r11
            );
            assert_eq!(exit, Exit::Shutdown, "{name}");
            assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (USER_CS, 3, 1), "{name}");
            assert_eq!((s.ss.selector, s.ss.dpl), (USER_SS, 3), "{name}");
            assert_eq!(r.rsp, STACK_TOP - 8, "{name}: rsp");
            match resume {
                Resume::AtInsn => {
                    assert_eq!(r.rip, l[0], "{name}: rip at the faulting instruction");
                    assert_eq!(r.rflags, 0x10246, "{name}: RF set, as for a fault");
                    assert!(
                        markers_intact(&r).is_empty(),
                        "{name}: {:?}",
                        markers_intact(&r)
                    );
                }
                Resume::Next => {
                    assert_eq!(r.rip, l[1], "{name}: rip after the trapping instruction");
                    assert_eq!(r.rflags, 0x246, "{name}");
                    assert!(
                        markers_intact(&r).is_empty(),
                        "{name}: {:?}",
                        markers_intact(&r)
                    );
                }
                Resume::Syscall => {
                    assert_eq!(r.rip, LSTAR_MARK, "{name}: rip = LSTAR");
                    assert_eq!(r.rcx, l[1], "{name}: rcx = return address");
                    assert_eq!(r.r11, 0x246, "{name}: r11 = user rflags");
                    assert_eq!(r.rflags, 0x10246, "{name}: rflags not masked by SFMASK");
                    let bad = markers_intact(&r);
                    assert_eq!(bad, ["rcx", "r11"], "{name}: only rcx/r11 change");
                    // A quirk: CR2 is left holding LSTAR; x86emu must keep its own CR2.
                    assert_eq!(s.cr2, LSTAR_MARK, "{name}: cr2");
                }
            }
            if name.starts_with("#PF") {
                assert_eq!(s.cr2, VA_UNMAPPED, "cr2 of the page fault");
            }
            let ev = p.vcpu.get_vcpu_events().unwrap();
            assert_eq!(
                (
                    ev.exception.injected,
                    ev.exception.pending,
                    ev.interrupt.injected
                ),
                (0, 0, 0),
                "{name}: nothing left pending after the shutdown"
            );
        }
    }
}

/// Q1: KVM_GUESTDBG_USE_SW_BP does not turn a user-mode int3 into KVM_EXIT_DEBUG on this
/// host: it still ends in a shutdown with RIP after the int3 (so x86emu must recognise
/// a trap by RFLAGS.RF clear and the 0xCC byte before RIP).
#[test]
fn int3_with_sw_breakpoints_still_ends_in_shutdown() {
    let mut p = Probe::with_lstar();
    let dbg = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP,
        ..Default::default()
    };
    p.vcpu.set_guest_debug(&dbg).unwrap();
    let l = p.load(|a, ls| {
        markers(a);
        label(a, ls);
        a.int3().unwrap();
        label(a, ls);
        a.syscall().unwrap();
    });
    p.set_rip(CODE);
    let (exit, t) = p.timed_run();
    let r = p.regs();
    eprintln!(
        "int3 under USE_SW_BP -> {exit:?} in {t:?}, rip={:#x} (int3 at {:#x})",
        r.rip, l[0]
    );
    assert_eq!(exit, Exit::Shutdown);
    assert_eq!(r.rip, l[1]);
}

/// Q1(d): cost of one switch into user mode and back: set_regs + set_sregs + set_xsave +
/// KVM_RUN (user code: one SYSCALL) + get_regs + get_sregs + get_xsave, median of 10k.
#[test]
fn switch_round_trip_cost() {
    let mut p = Probe::with_lstar();
    p.load(|a, _| {
        a.add(rbx, 1).unwrap();
        a.syscall().unwrap();
    });
    let sregs = p.user_sregs();
    let xs = p.xsave();
    let n = 10_000;
    let mut full = Vec::with_capacity(n);
    let mut run_only = Vec::with_capacity(n);
    let mut parts = [Duration::ZERO; 7];
    let mut count = 0u64;
    for _ in 0..n {
        let t0 = Instant::now();
        let regs = kvm_regs {
            rip: CODE,
            rsp: STACK_TOP - 8,
            rflags: 0x202,
            rbx: count,
            ..Default::default()
        };
        p.vcpu.set_regs(&regs).unwrap();
        let t1 = Instant::now();
        p.vcpu.set_sregs(&sregs).unwrap();
        let t2 = Instant::now();
        p.set_xsave(&xs);
        let t3 = Instant::now();
        let e = p.run();
        let t4 = Instant::now();
        let r = p.regs();
        let t5 = Instant::now();
        let _s = p.sregs();
        let t6 = Instant::now();
        let _x = p.xsave();
        let t7 = Instant::now();
        assert_eq!(e, Exit::Shutdown);
        assert_eq!(r.rip, LSTAR_MARK);
        assert_eq!(r.rbx, count + 1, "user code ran once per entry");
        count = r.rbx;
        full.push(t7 - t0);
        run_only.push(t4 - t3);
        for (i, d) in [
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            t6 - t5,
            t7 - t6,
        ]
        .into_iter()
        .enumerate()
        {
            parts[i] += d;
        }
    }
    // Only set_regs + run + get_regs (the state a SYSCALL round trip must move).
    let mut lean = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let regs = kvm_regs {
            rip: CODE,
            rsp: STACK_TOP - 8,
            rflags: 0x202,
            rbx: count,
            ..Default::default()
        };
        p.vcpu.set_regs(&regs).unwrap();
        assert_eq!(p.run(), Exit::Shutdown);
        count = p.regs().rbx;
        lean.push(t0.elapsed());
    }
    // For scale: a trivial system call, and a KVM_RUN that never enters the guest.
    let mut sys = Vec::with_capacity(n);
    let mut no_entry = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: getppid has no preconditions.
        unsafe { libc::getppid() };
        sys.push(t.elapsed());
        p.vcpu.set_kvm_immediate_exit(1);
        let t = Instant::now();
        assert_eq!(p.run(), Exit::Errno(libc::EINTR));
        no_entry.push(t.elapsed());
        p.vcpu.set_kvm_immediate_exit(0);
    }
    eprintln!(
        "for scale: getppid {:?}, KVM_RUN with immediate_exit (no guest entry) {:?}",
        median(&mut sys),
        median(&mut no_entry)
    );
    let names = [
        "set_regs",
        "set_sregs",
        "set_xsave",
        "KVM_RUN",
        "get_regs",
        "get_sregs",
        "get_xsave",
    ];
    for (nm, d) in names.iter().zip(parts) {
        eprintln!("  mean {nm:10} {:?}", d / n as u32);
    }
    let full_m = median(&mut full);
    let run_m = median(&mut run_only);
    let lean_m = median(&mut lean);
    eprintln!(
        "round trip (all state) median {full_m:?}; KVM_RUN alone {run_m:?}; \
         set_regs+run+get_regs {lean_m:?}"
    );
    assert!(
        full_m < Duration::from_millis(1),
        "a switch costs {full_m:?}"
    );
}

static KICKS: AtomicU64 = AtomicU64::new(0);

/// Q2: user code spinning forever is kicked out by immediate_exit + a signal (as the VMM
/// kicks vCPUs with SIGRTMIN): KVM_RUN fails with EINTR, RIP is inside the loop, the loop's
/// counter kept counting, and re-entry continues it.
#[test]
fn spinning_user_code_is_kicked_out_by_a_signal() {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        KICKS.fetch_add(1, Ordering::Relaxed);
    }
    let sig = vmm_sys_util::signal::SIGRTMIN();
    vmm_sys_util::signal::register_signal_handler(sig, on_kick).unwrap();
    let mut p = Probe::with_lstar();
    let l = p.load(|a, ls| {
        a.xor(ebx, ebx).unwrap();
        label(a, ls);
        a.add(rbx, 1).unwrap();
        a.jmp(ls[0]).unwrap();
        label(a, ls);
        a.nop().unwrap();
    });
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let run_ptr = p.vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run as usize;
    let base = Instant::now();
    let kick_at = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let rounds = 200u64;
    let kicker = {
        let (kick_at, acked, done) = (kick_at.clone(), acked.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..rounds {
                std::thread::sleep(Duration::from_millis(2));
                let with_immediate_exit = i % 2 == 0;
                kick_at.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                if with_immediate_exit {
                    // SAFETY: the vCPU's kvm_run mapping lives until `done`; immediate_exit is
                    // a byte KVM reads on entry, written here as the API documents.
                    unsafe {
                        std::ptr::write_volatile(
                            std::ptr::addr_of_mut!(
                                (*(run_ptr as *mut kvm_bindings::kvm_run)).immediate_exit
                            ),
                            1,
                        )
                    };
                }
                // SAFETY: `me` is the test thread, alive until it joins this thread.
                unsafe { libc::pthread_kill(me, sig) };
                while acked.load(Ordering::SeqCst) <= i {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut lat = [Vec::new(), Vec::new()];
    let mut last_rbx = 0;
    let mut i = 0u64;
    while !done.load(Ordering::SeqCst) && i < rounds {
        let e = p.run();
        let now = base.elapsed().as_nanos() as u64;
        let r = p.regs();
        assert_eq!(e, Exit::Errno(libc::EINTR), "round {i}");
        // On a loaded host the first kick can come before the vCPU ran anything: RIP is
        // then still at the first instruction, before the loop.
        assert!(
            (r.rip >= l[0] && r.rip < l[1]) || (i == 0 && r.rip == CODE),
            "rip {:#x} inside the loop",
            r.rip
        );
        assert!(r.rbx >= last_rbx, "the counter only grows");
        last_rbx = r.rbx;
        lat[(i % 2) as usize].push(Duration::from_nanos(now - kick_at.load(Ordering::SeqCst)));
        p.vcpu.set_kvm_immediate_exit(0);
        acked.store(i + 1, Ordering::SeqCst);
        i += 1;
    }
    kicker.join().unwrap();
    assert!(
        last_rbx > 1_000_000,
        "user code ran natively between kicks: {last_rbx}"
    );
    for (k, name) in [(0, "immediate_exit + signal"), (1, "signal only")] {
        let v = &mut lat[k];
        let m = median(v);
        let max = *v.iter().max().unwrap();
        eprintln!(
            "kick ({name}): median {m:?}, max {max:?} over {} kicks",
            v.len()
        );
        // Every round above already returned EINTR because of its kick (a timer tick does
        // not end KVM_RUN). The latency is a figure, not a pass mark: on this 2-core host
        // under other load the kicker thread itself waits for a CPU (medians of 1.7 and
        // 3.8 ms seen, against ~50 µs idle); only a kick stuck for good fails here.
        assert!(m < Duration::from_millis(50), "{name}: {m:?}");
    }
    eprintln!("loop iterations across all runs: {last_rbx}");
    assert!(KICKS.load(Ordering::Relaxed) >= rounds);
}

/// How a test tells KVM that guest page tables changed behind its back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sync {
    Nothing,
    SetSregsSameCr3,
    SetSregsOtherCr3AndBack,
    MemslotDeleteAndReadd,
    DirtyLogToggle,
    MprotectOldDataPage,
    MadviseOldDataPage,
    MprotectPageTablePage,
    MadvisePageTablePage,
}

const SYNCS: [Sync; 9] = [
    Sync::Nothing,
    Sync::SetSregsSameCr3,
    Sync::SetSregsOtherCr3AndBack,
    Sync::MemslotDeleteAndReadd,
    Sync::DirtyLogToggle,
    Sync::MprotectOldDataPage,
    Sync::MadviseOldDataPage,
    Sync::MprotectPageTablePage,
    Sync::MadvisePageTablePage,
];

impl Probe {
    fn host_page(&self, gpa: u64) -> *mut libc::c_void {
        // SAFETY: only forms a pointer inside the guest memory mapping.
        unsafe { self.mem.add(gpa as usize).cast() }
    }

    fn apply(&mut self, how: Sync, data_page: u64) {
        match how {
            Sync::Nothing => {}
            Sync::SetSregsSameCr3 => {
                let s = self.sregs();
                self.vcpu.set_sregs(&s).unwrap();
            }
            Sync::SetSregsOtherCr3AndBack => {
                let mut s = self.sregs();
                s.cr3 = PML4_ALT;
                self.vcpu.set_sregs(&s).unwrap();
                s.cr3 = PML4;
                self.vcpu.set_sregs(&s).unwrap();
            }
            Sync::MemslotDeleteAndReadd => {
                let f = self.slot_flags;
                self.set_slot(0, f);
                self.set_slot(MEM_SIZE as u64, f);
            }
            Sync::DirtyLogToggle => {
                self.set_slot(MEM_SIZE as u64, KVM_MEM_LOG_DIRTY_PAGES);
                self.set_slot(MEM_SIZE as u64, 0);
            }
            Sync::MprotectOldDataPage | Sync::MprotectPageTablePage => {
                let page = if how == Sync::MprotectOldDataPage {
                    data_page
                } else {
                    PT
                };
                let h = self.host_page(page);
                // SAFETY: a page of our own guest mapping; access is restored at once.
                unsafe {
                    assert_eq!(libc::mprotect(h, 4096, libc::PROT_READ), 0);
                    assert_eq!(
                        libc::mprotect(h, 4096, libc::PROT_READ | libc::PROT_WRITE),
                        0
                    );
                }
            }
            Sync::MadviseOldDataPage | Sync::MadvisePageTablePage => {
                let page = if how == Sync::MadviseOldDataPage {
                    data_page
                } else {
                    PT
                };
                // SAFETY: a page of our own shared mapping: DONTNEED drops only the host
                // PTEs, the shmem contents stay.
                unsafe {
                    assert_eq!(
                        libc::madvise(self.host_page(page), 4096, libc::MADV_DONTNEED),
                        0
                    )
                };
            }
        }
    }

    /// User code: rax = [VA_X]; then a store to [VA_X + 8]; then SYSCALL.
    fn load_reader(&self) -> Vec<u64> {
        self.load(|a, ls| {
            label(a, ls);
            a.mov(rax, qword_ptr(VA_X)).unwrap();
            label(a, ls);
            a.mov(qword_ptr(VA_X + 8), rax).unwrap();
            a.syscall().unwrap();
        })
    }

    fn run_reader(&mut self) -> (Exit, kvm_regs) {
        self.set_rip(CODE);
        let e = self.run();
        (e, self.regs())
    }
}

/// What user code saw after the host rewrote a PTE and applied `how`.
#[derive(Debug)]
struct Seen {
    remap_to_b: bool,
    unmap_faults: bool,
    write_protect_faults: bool,
    pde_switch_seen: bool,
}

fn coherence(how: Sync) -> Seen {
    let warm = |p: &mut Probe| {
        for _ in 0..2 {
            let (e, r) = p.run_reader();
            assert_eq!(
                (e, r.rip, r.rax),
                (Exit::Shutdown, LSTAR_MARK, 0xaaaa_aaaa_aaaa_aaaa)
            );
        }
    };
    // Remap VA_X: A -> B.
    let mut p = Probe::with_lstar();
    let l = p.load_reader();
    warm(&mut p);
    p.set_pte(VA_X, PAGE_B | PTE_UWP);
    p.apply(how, PAGE_A);
    let (_, r) = p.run_reader();
    let remap_to_b = r.rax == 0xbbbb_bbbb_bbbb_bbbb;
    // Unmap VA_X.
    let mut p = Probe::with_lstar();
    p.load_reader();
    warm(&mut p);
    p.set_pte(VA_X, 0);
    p.apply(how, PAGE_A);
    let (_, r) = p.run_reader();
    let unmap_faults = r.rip == l[0];
    // Write-protect VA_X.
    let mut p = Probe::with_lstar();
    p.load_reader();
    warm(&mut p);
    p.set_pte(VA_X, PAGE_A | PTE_P | PTE_U | PTE_A | PTE_D);
    p.apply(how, PAGE_A);
    let (_, r) = p.run_reader();
    let write_protect_faults = r.rip == l[1];
    // Switch the PDE to another page table that maps VA_X to B.
    let mut p = Probe::with_lstar();
    p.load_reader();
    warm(&mut p);
    for i in 0..512 {
        p.write_u64(PT2 + i * 8, p.read_u64(PT + i * 8));
    }
    p.write_u64(PT2 + (VA_X >> 12) * 8, PAGE_B | PTE_UWP);
    p.write_u64(PD, PT2 | PTE_UWP);
    p.apply(how, PAGE_A);
    let (_, r) = p.run_reader();
    let pde_switch_seen = r.rax == 0xbbbb_bbbb_bbbb_bbbb;
    Seen {
        remap_to_b,
        unmap_faults,
        write_protect_faults,
        pde_switch_seen,
    }
}

/// Cost of `how` plus the next entry (which may have to rebuild shadow pages), minus an
/// entry without it; median of 200.
fn sync_cost(how: Sync) -> (Duration, Duration) {
    let mut p = Probe::with_lstar();
    p.load_reader();
    let mut with = Vec::new();
    let mut alone = Vec::new();
    let mut base = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        p.run_reader();
        base.push(t.elapsed());
        let t = Instant::now();
        p.apply(how, PAGE_A);
        alone.push(t.elapsed());
        p.run_reader();
        with.push(t.elapsed());
    }
    let b = median(&mut base);
    (median(&mut alone), median(&mut with).saturating_sub(b))
}

/// Q3: the host rewrites guest PTEs directly (as x86emu will); which userspace actions
/// make PVM's shadow page tables follow. A memslot delete + re-add always does; an
/// MMU-notifier invalidation of the old data page (mprotect or MADV_DONTNEED) does for
/// leaf PTE changes; doing nothing, or KVM_SET_SREGS, leaves the stale mapping in use.
#[test]
fn host_writes_to_guest_page_tables_need_an_explicit_invalidation() {
    let mut table = Vec::new();
    for how in SYNCS {
        let seen = coherence(how);
        let (alone, with_rebuild) = sync_cost(how);
        eprintln!(
            "{how:?}: {seen:?}; costs {alone:?} itself, {with_rebuild:?} with the next entry's \
             extra work"
        );
        table.push((how, seen));
    }
    let get = |h: Sync| &table.iter().find(|(x, _)| *x == h).unwrap().1;
    // Nothing done: the stale translation stays in use.
    let n = get(Sync::Nothing);
    assert!(
        !n.remap_to_b && !n.unmap_faults && !n.write_protect_faults,
        "{n:?}"
    );
    // A memslot delete + re-add zaps every shadow page: everything is picked up.
    let m = get(Sync::MemslotDeleteAndReadd);
    assert!(
        m.remap_to_b && m.unmap_faults && m.write_protect_faults && m.pde_switch_seen,
        "{m:?}"
    );
    // MMU notifiers on the page the stale translation pointed to: leaf changes are seen.
    for h in [Sync::MprotectOldDataPage, Sync::MadviseOldDataPage] {
        let s = get(h);
        assert!(
            s.remap_to_b && s.unmap_faults && s.write_protect_faults,
            "{h:?}: {s:?}"
        );
    }
}

/// Q3: permission upgrades need no action: a PTE that goes from not present to present
/// (demand paging), or from read-only to writable (COW resolved), is picked up on the next
/// entry, because the fault left no translation (or only a read-only one) behind.
#[test]
fn permission_upgrades_need_no_invalidation() {
    let mut p = Probe::with_lstar();
    let l = p.load_reader();
    p.set_pte(VA_X, 0);
    let (e, r) = p.run_reader();
    assert_eq!(
        (e, r.rip),
        (Exit::Shutdown, l[0]),
        "read of a non-present page faults"
    );
    assert_eq!(p.sregs().cr2, VA_X);
    p.set_pte(VA_X, PAGE_B | PTE_P | PTE_U);
    let (e, r) = p.run_reader();
    assert_eq!(
        (e, r.rip),
        (Exit::Shutdown, l[1]),
        "now the read works, the store faults"
    );
    assert_eq!(r.rax, 0xbbbb_bbbb_bbbb_bbbb);
    p.set_pte(VA_X, PAGE_B | PTE_UWP);
    let (e, r) = p.run_reader();
    assert_eq!(
        (e, r.rip),
        (Exit::Shutdown, LSTAR_MARK),
        "and now the store works too"
    );
    assert_eq!(p.read_u64(PAGE_B + 8), 0xbbbb_bbbb_bbbb_bbbb);
}

fn has(entries: &[kvm_bindings::kvm_cpuid_entry2], leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map(|e| (e.eax, e.ebx, e.ecx, e.edx))
        .unwrap_or_default()
}

/// Q4: what KVM_GET_SUPPORTED_CPUID offers here: SSE2 yes, but no XSAVE/OSXSAVE/AVX in
/// leaf 1 ECX and no AVX2 in leaf 7 (so a guest kernel cannot enable AVX state through KVM).
#[test]
fn supported_cpuid_has_sse_but_no_xsave_or_avx() {
    let kvm = open_kvm();
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let e = c.as_slice();
    let (_, _, ecx1, edx1) = has(e, 1, 0);
    let (_, ebx7, _, _) = has(e, 7, 0);
    let (eax_d, _, _, _) = has(e, 0xd, 0);
    let host1 = std::arch::x86_64::__cpuid(1);
    eprintln!(
        "supported leaf1 ecx={ecx1:#x} edx={edx1:#x} leaf7 ebx={ebx7:#x} leaf0xd eax={eax_d:#x}; \
         host leaf1 ecx={:#x}",
        host1.ecx
    );
    assert_ne!(edx1 & (1 << 26), 0, "SSE2");
    assert_eq!(ecx1 & (1 << 26), 0, "XSAVE offered");
    assert_eq!(ecx1 & (1 << 28), 0, "AVX offered");
    assert_eq!(ebx7 & (1 << 5), 0, "AVX2 offered");
    assert_ne!(host1.ecx & (1 << 28), 0, "the host CPU itself has AVX");
}

/// Q4: SSE state round-trips through KVM_SET_XSAVE / KVM_GET_XSAVE across a user-mode run;
/// FS/GS bases set with KVM_SET_SREGS are what user code sees, and WRFSBASE in user code
/// shows in KVM_GET_SREGS; RDTSC in user code reads the host TSC whatever IA32_TSC was set to.
/// AVX instructions execute natively at CPL3 although CPUID hides AVX (the host's XCR0 is in
/// force), so YMM upper halves are state that KVM_GET_XSAVE must (or does not) carry.
#[test]
fn fpu_segment_base_and_tsc_state_across_a_user_run() {
    let mut p = Probe::with_lstar();
    // xmm_i = pattern i in the legacy XSAVE area (offset 160), MXCSR default.
    let mut xs = p.xsave();
    for i in 0..16u32 {
        for d in 0..4u32 {
            xs.region[40 + (i * 4 + d) as usize] = 0x1000_0000 * (i % 8 + 1) + i * 16 + d;
        }
    }
    // XSTATE_BV (byte 512): SSE state present, or XRSTOR loads the init state (zeros).
    xs.region[128] |= 2;
    p.set_xsave(&xs);
    let mut s = p.user_sregs();
    s.fs.base = SCRATCH + 0x800;
    s.gs.base = SCRATCH + 0x900;
    p.vcpu.set_sregs(&s).unwrap();
    p.write_u64(SCRATCH + 0x800, 0xf5f5_f5f5);
    p.write_u64(SCRATCH + 0x900, 0x6565_6565);
    p.set_msr(MSR_TSC, 0);
    p.set_msr(MSR_SFMASK, 0x700);
    p.load(|a, _| {
        let regs = [
            xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
            xmm14, xmm15,
        ];
        for (i, r) in regs.into_iter().enumerate() {
            a.movdqu(xmmword_ptr(SCRATCH + 16 * i as u64), r).unwrap();
        }
        a.paddd(xmm0, xmm1).unwrap();
        a.mov(r8, qword_ptr(0).fs()).unwrap();
        a.mov(r9, qword_ptr(0).gs()).unwrap();
        a.mov(rdi, 0x12_3000u64).unwrap();
        a.wrfsbase(rdi).unwrap();
        a.rdtsc().unwrap();
        a.shl(rdx, 32).unwrap();
        a.or(rax, rdx).unwrap();
        a.mov(r10, rax).unwrap();
        // AVX at CPL3 although CPUID says no AVX: ymm3 = all ones.
        a.vpcmpeqd(ymm3, ymm3, ymm3).unwrap();
        a.syscall().unwrap();
    });
    // SAFETY: RDTSC is available on every x86-64 CPU.
    let before = unsafe { std::arch::x86_64::_rdtsc() };
    p.set_rip(CODE);
    let e = p.run();
    // SAFETY: as above.
    let after = unsafe { std::arch::x86_64::_rdtsc() };
    let r = p.regs();
    let s = p.sregs();
    let x = p.xsave();
    eprintln!(
        "exit {e:?} rip={:#x}; r8={:#x} r9={:#x} fs.base={:#x} guest tsc={} host \
         tsc {before}..{after}; ymm3 high half in xsave: {:x?}; xstate_bv={:#x}",
        r.rip,
        r.r8,
        r.r9,
        s.fs.base,
        r.r10,
        &x.region[144 + 12..144 + 16],
        x.region[128]
    );
    assert_eq!(
        (e, r.rip),
        (Exit::Shutdown, LSTAR_MARK),
        "the AVX instruction ran natively"
    );
    for i in 0..16u32 {
        for d in 0..4u32 {
            let want = 0x1000_0000 * (i % 8 + 1) + i * 16 + d;
            let got = p.read_u64(SCRATCH + 16 * i as u64 + 4 * d as u64) as u32;
            assert_eq!(got, want, "user code saw xmm{i} dword {d}");
        }
    }
    for d in 0..4u32 {
        assert_eq!(
            x.region[40 + d as usize],
            (0x1000_0000 + d).wrapping_add(0x2000_0000 + 16 + d),
            "xmm0 after paddd, read back with KVM_GET_XSAVE"
        );
    }
    assert_eq!(&x.region[40 + 12..40 + 16], [u32::MAX; 4], "ymm3 low half");
    assert_eq!(x.region[128] & 4, 4, "XSTATE_BV has AVX state");
    assert_eq!(
        &x.region[144 + 12..144 + 16],
        [u32::MAX; 4],
        "ymm3 high half carried"
    );
    assert_eq!(
        (r.r8, r.r9),
        (0xf5f5_f5f5, 0x6565_6565),
        "fs/gs bases in user code"
    );
    assert_eq!(s.fs.base, 0x12_3000, "WRFSBASE seen by KVM_GET_SREGS");
    assert!(
        r.r10 >= before && r.r10 <= after,
        "guest RDTSC is the host TSC though IA32_TSC was set to 0"
    );
}
