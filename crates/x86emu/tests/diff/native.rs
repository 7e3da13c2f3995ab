//! Runs one instruction natively on the host CPU from a given register/memory state.
//!
//! A trampoline in an RWX page loads the x87 unit (FXRSTOR64 of an image built from the
//! state), MXCSR, YMM0-15, RFLAGS and the GPRs from a state block, executes the
//! instruction placed in a 16-byte slot (NOP padded), stores everything back (FXSAVE64 for
//! the x87 side) and returns. Memory operands point into a scratch buffer mapped at the
//! same fixed address that the emulated guest uses, so effective addresses agree in both
//! worlds.
//!
//! An instruction that traps on the host (an unmasked SIMD exception, #MF for an x87
//! exception left pending by the random state, an alignment #GP, #DE) does not kill the
//! test: a signal handler that recognises a fault inside the slot records the vector
//! (the kernel's trap number) and resumes at the epilogue, which stores the state the
//! fault left. The caller compares that vector with the emulator's fault.

use iced_x86::code_asm::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Guest-virtual = host-virtual address of the scratch buffer (64-bit runs).
pub const SCRATCH: u64 = 0x3a5a_0000_0000;
/// The scratch buffer for compatibility-mode runs: below 4 GiB.
pub const SCRATCH32: u64 = 0x5a00_0000;
/// Linux's user code selectors: 32-bit (compatibility mode) and 64-bit.
const USER32_CS: u16 = 0x23;
const USER64_CS: u16 = 0x33;
pub const SCRATCH_LEN: usize = 0x8000;

/// Architectural state a case starts from and ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeState {
    pub xmm: [u128; 16],
    /// Bits 255:128 of YMM0-15.
    pub ymm_hi: [u128; 16],
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    /// x87 control, status and abridged tag word (bit i: physical register i valid).
    pub fcw: u16,
    pub fsw: u16,
    pub ftw: u8,
    /// ST(0)-ST(7) (relative to TOP, as FXSAVE stores them), 80 bits each.
    pub st: [u128; 8],
}

impl Default for NativeState {
    /// The x87 unit as FNINIT leaves it, MXCSR at its reset value, everything else zero.
    fn default() -> Self {
        NativeState {
            xmm: [0; 16],
            ymm_hi: [0; 16],
            gpr: [0; 16],
            rflags: 0x202,
            mxcsr: 0x1f80,
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            st: [0; 8],
        }
    }
}

/// The block the trampoline reads and writes, at the offsets below.
#[repr(C, align(64))]
struct Block {
    fx: [u8; 512],
    xmm: [u128; 16],
    ymm_hi: [u128; 16],
    gpr: [u64; 16],
    rflags: u64,
    host_rsp: u64,
    mxcsr: u32,
    host_mxcsr: u32,
}

const OFF_FX: i32 = std::mem::offset_of!(Block, fx) as i32;
const OFF_XMM: i32 = std::mem::offset_of!(Block, xmm) as i32;
const OFF_YMM_HI: i32 = std::mem::offset_of!(Block, ymm_hi) as i32;
const OFF_GPR: i32 = std::mem::offset_of!(Block, gpr) as i32;
const OFF_FLAGS: i32 = std::mem::offset_of!(Block, rflags) as i32;
const OFF_HOST_RSP: i32 = std::mem::offset_of!(Block, host_rsp) as i32;
const OFF_MXCSR: i32 = std::mem::offset_of!(Block, mxcsr) as i32;
const OFF_HOST_MXCSR: i32 = std::mem::offset_of!(Block, host_mxcsr) as i32;

pub struct Native {
    code: *mut u8,
    slot: usize,
    block: Box<Block>,
    scratch: u64,
}

// SAFETY: the raw pointers are only used while holding the global NATIVE mutex.
unsafe impl Send for Native {}

static NATIVE: Mutex<Option<Native>> = Mutex::new(None);
static NATIVE32: Mutex<Option<Native>> = Mutex::new(None);

/// Per trampoline (64-bit, compatibility): the slot's address, and the trap number a
/// fault inside it recorded (-1: none). Written by the signal handler.
static SLOT_AT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static TRAPPED: [AtomicI64; 2] = [AtomicI64::new(-1), AtomicI64::new(-1)];
/// The handlers that were installed before ours, for faults that are not ours.
static mut OLD_ACTIONS: [std::mem::MaybeUninit<libc::sigaction>; 4] =
    [std::mem::MaybeUninit::uninit(); 4];
const TRAP_SIGNALS: [libc::c_int; 4] = [libc::SIGFPE, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL];

pub fn host_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

extern "C" fn on_trap(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers; we only read
    // and write its general registers, and OLD_ACTIONS was filled before installation.
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        let gregs = &mut (*uc).uc_mcontext.gregs;
        let rip = gregs[libc::REG_RIP as usize] as u64;
        for k in 0..2 {
            let slot = SLOT_AT[k].load(Ordering::Relaxed);
            if slot != 0 && rip >= slot && rip < slot + 16 {
                TRAPPED[k].store(gregs[libc::REG_TRAPNO as usize], Ordering::Relaxed);
                // Resume after the slot: the epilogue (or, in compatibility mode, the far
                // jump back to it) stores the state as the fault left it.
                gregs[libc::REG_RIP as usize] = (slot + 16) as i64;
                return;
            }
        }
        // Not ours: put the previous handler back and let the fault happen again.
        if let Some(i) = TRAP_SIGNALS.iter().position(|&s| s == sig) {
            let old = &raw const OLD_ACTIONS[i];
            libc::sigaction(sig, (*old).as_ptr(), std::ptr::null_mut());
        }
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain sigaction calls; OLD_ACTIONS is written before any handler of ours
        // can run and never again.
        unsafe {
            for (i, &sig) in TRAP_SIGNALS.iter().enumerate() {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_trap as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut act.sa_mask);
                let old = &raw mut OLD_ACTIONS[i];
                assert_eq!(libc::sigaction(sig, &act, (*old).as_mut_ptr()), 0);
            }
        }
    });
    thread_local! {
        static ALT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    // The faulting instruction runs on a stack inside the scratch buffer: the signal
    // frame must go elsewhere.
    ALT.with(|a| {
        if !a.get() {
            const LEN: usize = 256 * 1024;
            let mem: &'static mut [u8] = Box::leak(vec![0u8; LEN].into_boxed_slice());
            let stack = libc::stack_t {
                ss_sp: mem.as_mut_ptr() as *mut libc::c_void,
                ss_flags: 0,
                ss_size: LEN,
            };
            // SAFETY: the leaked buffer lives for the rest of the process.
            unsafe { assert_eq!(libc::sigaltstack(&stack, std::ptr::null_mut()), 0) };
            a.set(true);
        }
    });
}

fn gprs() -> [AsmRegister64; 16] {
    [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ]
}

fn xmms() -> [AsmRegisterXmm; 16] {
    [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ]
}

fn ymms() -> [AsmRegisterYmm; 16] {
    [
        ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13,
        ymm14, ymm15,
    ]
}

fn prologue(st: u64, compat: bool) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r).unwrap();
    }
    if compat {
        // 64-bit Linux runs with null DS/ES, which compatibility mode cannot use.
        a.mov(eax, 0x2b).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
    }
    a.mov(rax, st).unwrap();
    a.mov(qword_ptr(rax + OFF_HOST_RSP), rsp).unwrap();
    a.stmxcsr(dword_ptr(rax + OFF_HOST_MXCSR)).unwrap();
    // The x87 unit first (FXRSTOR also loads MXCSR and XMM, which follow).
    a.fxrstor64(ptr(rax + OFF_FX)).unwrap();
    a.ldmxcsr(dword_ptr(rax + OFF_MXCSR)).unwrap();
    let avx = host_avx();
    for (i, (x, y)) in xmms().into_iter().zip(ymms()).enumerate() {
        let lo = xmmword_ptr(rax + (OFF_XMM + 16 * i as i32));
        if avx {
            a.vmovdqu(x, lo).unwrap();
            a.vinsertf128(y, y, xmmword_ptr(rax + (OFF_YMM_HI + 16 * i as i32)), 1)
                .unwrap();
        } else {
            a.movdqu(x, lo).unwrap();
        }
    }
    a.push(qword_ptr(rax + OFF_FLAGS)).unwrap();
    a.popfq().unwrap();
    for (i, r) in gprs().into_iter().enumerate() {
        if i != 0 {
            a.mov(r, qword_ptr(rax + (OFF_GPR + 8 * i as i32))).unwrap();
        }
    }
    a.mov(rax, qword_ptr(rax + OFF_GPR)).unwrap();
    a.assemble(0).unwrap()
}

fn epilogue(st: u64, compat: bool) -> Vec<u8> {
    // mov [moffs64], rax: the only way to store without a free register.
    let mut out = vec![0x48, 0xa3];
    out.extend_from_slice(&(st + OFF_GPR as u64).to_le_bytes());
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, st).unwrap();
    for (i, r) in gprs().into_iter().enumerate() {
        if i != 0 {
            a.mov(qword_ptr(rax + (OFF_GPR + 8 * i as i32)), r).unwrap();
        }
    }
    a.mov(rsp, qword_ptr(rax + OFF_HOST_RSP)).unwrap();
    a.pushfq().unwrap();
    a.pop(qword_ptr(rax + OFF_FLAGS)).unwrap();
    // Reset DF/AC/TF before returning to Rust code.
    a.push(2).unwrap();
    a.popfq().unwrap();
    let avx = host_avx();
    for (i, (x, y)) in xmms().into_iter().zip(ymms()).enumerate() {
        let lo = xmmword_ptr(rax + (OFF_XMM + 16 * i as i32));
        if avx {
            a.vmovdqu(lo, x).unwrap();
            a.vextractf128(xmmword_ptr(rax + (OFF_YMM_HI + 16 * i as i32)), y, 1)
                .unwrap();
        } else {
            a.movdqu(lo, x).unwrap();
        }
    }
    a.stmxcsr(dword_ptr(rax + OFF_MXCSR)).unwrap();
    // FXSAVE does not wait: an x87 exception the instruction left pending (FSW.ES) is
    // stored, not raised, and FNINIT then clears it.
    a.fxsave64(ptr(rax + OFF_FX)).unwrap();
    a.ldmxcsr(dword_ptr(rax + OFF_HOST_MXCSR)).unwrap();
    a.fninit().unwrap();
    if avx {
        a.vzeroupper().unwrap();
    }
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r).unwrap();
    }
    if compat {
        a.xor(ecx, ecx).unwrap();
        a.mov(ds, cx).unwrap();
        a.mov(es, cx).unwrap();
    }
    a.ret().unwrap();
    out.extend(a.assemble(0).unwrap());
    out
}

impl Native {
    fn new(compat: bool) -> Native {
        let scratch = if compat { SCRATCH32 } else { SCRATCH };
        // SAFETY: fresh anonymous mappings; the scratch one at a fixed, otherwise unused
        // address (MAP_FIXED_NOREPLACE fails instead of clobbering).
        unsafe {
            let s = libc::mmap(
                scratch as *mut libc::c_void,
                SCRATCH_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            assert_eq!(s as u64, scratch, "cannot map the scratch buffer");
            // Compatibility-mode code must sit below 4 GiB.
            let low = if compat { libc::MAP_32BIT } else { 0 };
            let code = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | low,
                -1,
                0,
            );
            assert_ne!(code, libc::MAP_FAILED);
            // SAFETY: Block is plain integers and byte arrays; all zeroes is valid.
            let block: Box<Block> = Box::new_zeroed().assume_init();
            let st = &*block as *const Block as u64;
            let pro = prologue(st, compat);
            let epi = epilogue(st, compat);
            let code = code as *mut u8;
            let base = code as u64;
            let mut img: Vec<u8> = pro;
            let slot;
            if compat {
                // 64-bit prologue, then JMP FAR [RIP+d] (m16:32) into compatibility mode;
                // the instruction; then JMP FAR ptr16:32 back to the 64-bit epilogue.
                let jmp_at = img.len();
                img.extend_from_slice(&[0xff, 0x2d, 0, 0, 0, 0]);
                slot = img.len();
                img.extend_from_slice(&[0x90; 16]);
                let back_at = img.len();
                img.extend_from_slice(&[0xea, 0, 0, 0, 0, 0, 0]);
                let epi_at = img.len();
                img.extend_from_slice(&epi);
                let ptr_at = img.len();
                img.extend_from_slice(&((base + slot as u64) as u32).to_le_bytes());
                img.extend_from_slice(&USER32_CS.to_le_bytes());
                let disp = (ptr_at as i64 - (jmp_at as i64 + 6)) as i32;
                img[jmp_at + 2..jmp_at + 6].copy_from_slice(&disp.to_le_bytes());
                img[back_at + 1..back_at + 5]
                    .copy_from_slice(&((base + epi_at as u64) as u32).to_le_bytes());
                img[back_at + 5..back_at + 7].copy_from_slice(&USER64_CS.to_le_bytes());
            } else {
                slot = img.len();
                img.extend_from_slice(&[0x90; 16]);
                img.extend_from_slice(&epi);
            }
            assert!(img.len() <= 4096);
            std::ptr::copy_nonoverlapping(img.as_ptr(), code, img.len());
            SLOT_AT[usize::from(compat)].store(base + slot as u64, Ordering::Relaxed);
            Native {
                code,
                slot,
                block,
                scratch,
            }
        }
    }

    fn exec(
        &mut self,
        insn: &[u8],
        input: &NativeState,
        mem: &mut [u8],
        compat: bool,
    ) -> (NativeState, Option<u8>) {
        assert!(insn.len() <= 16 && mem.len() == SCRATCH_LEN);
        let b = &mut *self.block;
        b.fx = [0; 512];
        b.fx[0..2].copy_from_slice(&input.fcw.to_le_bytes());
        b.fx[2..4].copy_from_slice(&input.fsw.to_le_bytes());
        b.fx[4] = input.ftw;
        b.fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        for (i, v) in input.st.iter().enumerate() {
            b.fx[32 + 16 * i..42 + 16 * i].copy_from_slice(&v.to_le_bytes()[..10]);
        }
        b.xmm = input.xmm;
        b.ymm_hi = input.ymm_hi;
        b.gpr = input.gpr;
        b.rflags = input.rflags;
        b.mxcsr = input.mxcsr;
        let k = usize::from(compat);
        TRAPPED[k].store(-1, Ordering::Relaxed);
        // SAFETY: the slot is 16 bytes inside our RWX page; the scratch mapping is ours;
        // the trampoline follows the C ABI (saves callee-saved registers, restores RSP,
        // MXCSR and an initialised x87 unit); memory operands point into the scratch
        // buffer, and a fault in the slot resumes at the epilogue (see `on_trap`).
        unsafe {
            std::ptr::write_bytes(self.code.add(self.slot), 0x90, 16);
            std::ptr::copy_nonoverlapping(insn.as_ptr(), self.code.add(self.slot), insn.len());
            std::ptr::copy_nonoverlapping(mem.as_ptr(), self.scratch as *mut u8, SCRATCH_LEN);
            let f: extern "C" fn() = std::mem::transmute(self.code);
            f();
            std::ptr::copy_nonoverlapping(self.scratch as *const u8, mem.as_mut_ptr(), SCRATCH_LEN);
        }
        let trap = TRAPPED[k].load(Ordering::Relaxed);
        let b = &*self.block;
        let mut out = *input;
        out.fcw = u16::from_le_bytes([b.fx[0], b.fx[1]]);
        out.fsw = u16::from_le_bytes([b.fx[2], b.fx[3]]);
        out.ftw = b.fx[4];
        for (i, v) in out.st.iter_mut().enumerate() {
            let mut w = [0u8; 16];
            w[..10].copy_from_slice(&b.fx[32 + 16 * i..42 + 16 * i]);
            *v = u128::from_le_bytes(w);
        }
        out.xmm = b.xmm;
        out.ymm_hi = b.ymm_hi;
        out.gpr = b.gpr;
        out.rflags = b.rflags;
        out.mxcsr = b.mxcsr;
        (out, (trap >= 0).then_some(trap as u8))
    }
}

/// Runs `insn` natively (in compatibility mode if `compat`); `mem` is the scratch
/// contents in and out. Returns the state after it, and the vector of the exception it
/// raised instead of completing, if it did.
pub fn run_native(
    insn: &[u8],
    input: &NativeState,
    mem: &mut [u8],
    compat: bool,
) -> (NativeState, Option<u8>) {
    install_handler();
    let lock = if compat { &NATIVE32 } else { &NATIVE };
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| Native::new(compat))
        .exec(insn, input, mem, compat)
}
