//! Runs one instruction natively on the host CPU from a given register/memory state.
//!
//! A trampoline in an RWX page loads GPRs, RFLAGS, XMM and MXCSR from a state block,
//! executes the instruction placed in a 16-byte slot (NOP padded), stores everything back
//! and returns. Memory operands point into a scratch buffer mapped at the same fixed
//! address that the emulated guest uses, so effective addresses agree in both worlds.

use iced_x86::code_asm::*;
use std::sync::Mutex;

/// Guest-virtual = host-virtual address of the scratch buffer (64-bit runs).
pub const SCRATCH: u64 = 0x3a5a_0000_0000;
/// The scratch buffer for compatibility-mode runs: below 4 GiB.
pub const SCRATCH32: u64 = 0x5a00_0000;
/// Linux's user code selectors: 32-bit (compatibility mode) and 64-bit.
const USER32_CS: u16 = 0x23;
const USER64_CS: u16 = 0x33;
pub const SCRATCH_LEN: usize = 0x8000;

#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeState {
    pub xmm: [u128; 16],
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub host_rsp: u64,
    pub mxcsr: u32,
    pub host_mxcsr: u32,
    /// x87 control and status words after the instruction (the trampoline re-initialises
    /// the x87 unit after each case, so every case starts from FNINIT state).
    pub fcw: u16,
    pub fsw: u16,
}

const OFF_XMM: i32 = 0;
const OFF_GPR: i32 = 256;
const OFF_FLAGS: i32 = 384;
const OFF_HOST_RSP: i32 = 392;
const OFF_MXCSR: i32 = 400;
const OFF_HOST_MXCSR: i32 = 404;
const OFF_FCW: i32 = 408;
const OFF_FSW: i32 = 410;

pub struct Native {
    code: *mut u8,
    slot: usize,
    state: Box<NativeState>,
    scratch: u64,
}

// SAFETY: the raw pointers are only used while holding the global NATIVE mutex.
unsafe impl Send for Native {}

static NATIVE: Mutex<Option<Native>> = Mutex::new(None);
static NATIVE32: Mutex<Option<Native>> = Mutex::new(None);

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
    a.ldmxcsr(dword_ptr(rax + OFF_MXCSR)).unwrap();
    for (i, x) in xmms().into_iter().enumerate() {
        a.movdqu(x, xmmword_ptr(rax + (OFF_XMM + 16 * i as i32)))
            .unwrap();
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
    for (i, x) in xmms().into_iter().enumerate() {
        a.movdqu(xmmword_ptr(rax + (OFF_XMM + 16 * i as i32)), x)
            .unwrap();
    }
    a.stmxcsr(dword_ptr(rax + OFF_MXCSR)).unwrap();
    a.ldmxcsr(dword_ptr(rax + OFF_HOST_MXCSR)).unwrap();
    a.fnstcw(word_ptr(rax + OFF_FCW)).unwrap();
    a.fnstsw(word_ptr(rax + OFF_FSW)).unwrap();
    a.fninit().unwrap();
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
            let state = Box::<NativeState>::default();
            let st = &*state as *const NativeState as u64;
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
            Native {
                code,
                slot,
                state,
                scratch,
            }
        }
    }

    fn exec(&mut self, insn: &[u8], input: &NativeState, mem: &mut [u8]) -> NativeState {
        assert!(insn.len() <= 16 && mem.len() == SCRATCH_LEN);
        // SAFETY: the slot is 16 bytes inside our RWX page; the scratch mapping is ours;
        // the trampoline follows the C ABI (saves callee-saved registers, restores RSP and
        // MXCSR); the instruction was checked by the emulator first not to fault, and its
        // memory operands point into the scratch buffer.
        unsafe {
            std::ptr::write_bytes(self.code.add(self.slot), 0x90, 16);
            std::ptr::copy_nonoverlapping(insn.as_ptr(), self.code.add(self.slot), insn.len());
            std::ptr::copy_nonoverlapping(mem.as_ptr(), self.scratch as *mut u8, SCRATCH_LEN);
            *self.state = *input;
            let f: extern "C" fn() = std::mem::transmute(self.code);
            f();
            std::ptr::copy_nonoverlapping(self.scratch as *const u8, mem.as_mut_ptr(), SCRATCH_LEN);
        }
        *self.state
    }
}

/// Runs `insn` natively (in compatibility mode if `compat`); `mem` is the scratch
/// contents in and out.
pub fn run_native(insn: &[u8], input: &NativeState, mem: &mut [u8], compat: bool) -> NativeState {
    let lock = if compat { &NATIVE32 } else { &NATIVE };
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| Native::new(compat))
        .exec(insn, input, mem)
}
