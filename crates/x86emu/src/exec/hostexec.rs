//! Instructions the host CPU computes for us: x87 arithmetic, MMX, SSE3 to SSE4.2, AVX,
//! AVX2, FMA, F16C, BMI1/2, ADX, MOVBE, POPCNT, CRC32, AES-NI, PCLMULQDQ, SHA, RDRAND and
//! RDSEED.
//!
//! Guest and host are both x86-64, so an instruction that only computes on registers and
//! one memory operand can run as itself: a small stub loads the registers it uses from a
//! context block, runs the instruction re-encoded with its memory operand pointing into
//! that block, and stores the registers back. The emulator keeps everything architectural
//! around it: privilege and mode checks, the CPU model's feature set (#UD for what the
//! model lacks), segmentation, paging and alignment of the memory operand, x87 and SIMD
//! exception masking (the host runs with every exception masked; an exception the guest
//! left unmasked is detected from the flags and delivered the guest's way), and FIP/FDP.
//! The results are the host's bit for bit, including 80-bit x87 arithmetic with precision
//! control and the transcendental instructions.
//!
//! Only instructions without control flow, without implicit memory operands and without
//! system effects are accepted (see [`plan`]); everything else stays #UD here.

use rustc_hash::FxHashMap;

use iced_x86::code_asm::{self as asm, CodeAssembler};
use iced_x86::{
    CpuidFeature as F, EncodingKind, Instruction, InstructionInfoFactory, Mnemonic as M, OpAccess,
    OpKind, Register,
};

use super::operand::{ea, mem_seg};
use crate::cpu::Core;
use crate::decode::Insn;
use crate::exceptions::{vector, Fault, Result};
use crate::platform::Platform;
use crate::state::cr::*;
use codemem::Arena;

/// What the stub reads and writes, at fixed offsets the generated code uses.
#[repr(C, align(64))]
pub(crate) struct Ctx {
    /// FXSAVE image of the x87/MMX state (offset 0).
    fx: [u8; 512],
    /// YMM0-15, low half first (offset 512).
    ymm: [[u128; 2]; 16],
    /// Host GPRs by number (offset 1024).
    gpr: [u64; 16],
    /// RFLAGS in and out (offset 1152).
    flags: u64,
    /// Guest MXCSR in and out (offset 1160), and the host's, kept while the stub runs.
    mxcsr: u32,
    host_mxcsr: u32,
    _pad: [u8; 48],
    /// The memory operand (offset 1216).
    mem: [u8; 64],
}

const OFF_FX: i32 = 0;
const OFF_YMM: i32 = 512;
const OFF_GPR: i32 = 1024;
const OFF_FLAGS: i32 = 1152;
const OFF_MXCSR: i32 = 1160;
const OFF_HOST_MXCSR: i32 = 1164;
const OFF_MEM: i32 = 1216;
const MEM_MAX: usize = 64;

/// Status flags the guest's instruction may read or write; the rest stay the host's own.
const STATUS: u64 = 0x8d5;
/// RFLAGS the stub runs with around the guest's status flags (IF and the fixed bit).
const HOST_FLAGS: u64 = 0x202;

type Stub = unsafe extern "C" fn(*mut Ctx);

/// ISA bits of the CPU model, from CPUID: what an instruction needs must be among them.
pub(crate) mod isa {
    pub const MMX: u64 = 1 << 0;
    pub const SSE3: u64 = 1 << 1;
    pub const SSSE3: u64 = 1 << 2;
    pub const SSE41: u64 = 1 << 3;
    pub const SSE42: u64 = 1 << 4;
    pub const POPCNT: u64 = 1 << 5;
    pub const AVX: u64 = 1 << 6;
    pub const AVX2: u64 = 1 << 7;
    pub const FMA: u64 = 1 << 8;
    pub const F16C: u64 = 1 << 9;
    pub const BMI1: u64 = 1 << 10;
    pub const BMI2: u64 = 1 << 11;
    pub const MOVBE: u64 = 1 << 12;
    pub const ADX: u64 = 1 << 13;
    pub const AES: u64 = 1 << 14;
    pub const PCLMUL: u64 = 1 << 15;
    pub const SHA: u64 = 1 << 16;
    pub const RDRAND: u64 = 1 << 17;
    pub const RDSEED: u64 = 1 << 18;
    pub const FPU: u64 = 1 << 19;
    pub const SSE: u64 = 1 << 20;
    pub const SSE2: u64 = 1 << 21;
    pub const LZCNT: u64 = 1 << 22;
    pub const CMOV: u64 = 1 << 23;
}

/// The ISA bit for an iced-x86 CPUID feature; None for features never run here.
fn isa_bit(f: F) -> Option<u64> {
    Some(match f {
        F::FPU | F::FPU287 | F::FPU387 => isa::FPU,
        F::CMOV => isa::CMOV,
        F::MMX => isa::MMX,
        F::SSE => isa::SSE,
        F::SSE2 => isa::SSE2,
        F::SSE3 => isa::SSE3,
        F::SSSE3 => isa::SSSE3,
        F::SSE4_1 => isa::SSE41,
        F::SSE4_2 => isa::SSE42,
        F::POPCNT => isa::POPCNT,
        F::AVX => isa::AVX,
        F::AVX2 => isa::AVX2,
        F::FMA => isa::FMA,
        F::F16C => isa::F16C,
        F::BMI1 => isa::BMI1,
        F::BMI2 => isa::BMI2,
        F::MOVBE => isa::MOVBE,
        F::ADX => isa::ADX,
        F::AES => isa::AES,
        F::PCLMULQDQ => isa::PCLMUL,
        F::SHA => isa::SHA,
        F::RDRAND => isa::RDRAND,
        F::RDSEED => isa::RDSEED,
        F::LZCNT => isa::LZCNT,
        F::INTEL8086 | F::INTEL386 | F::INTEL486 | F::X64 => 0,
        _ => return None,
    })
}

/// The ISA bits `ins` needs; None when it needs a feature never run here.
pub(crate) fn isa_need(ins: &Instruction) -> Option<u64> {
    ins.cpuid_features()
        .iter()
        .try_fold(0, |need, &f| Some(need | isa_bit(f)?))
}

/// The ISA bits a CPUID table advertises.
pub(crate) fn isa_of(t: &crate::cpuid::CpuidTable) -> u64 {
    let l1 = t.lookup(1, 0);
    let l7 = t.lookup(7, 0);
    let e1 = t.lookup(0x8000_0001, 0);
    let mut m = 0;
    let mut bit = |cond: bool, b: u64| {
        if cond {
            m |= b
        }
    };
    bit(l1.edx & 1 != 0, isa::FPU);
    bit(l1.edx & (1 << 15) != 0, isa::CMOV);
    bit(l1.edx & (1 << 23) != 0, isa::MMX);
    bit(l1.edx & (1 << 25) != 0, isa::SSE);
    bit(l1.edx & (1 << 26) != 0, isa::SSE2);
    bit(l1.ecx & 1 != 0, isa::SSE3);
    bit(l1.ecx & (1 << 1) != 0, isa::PCLMUL);
    bit(l1.ecx & (1 << 9) != 0, isa::SSSE3);
    bit(l1.ecx & (1 << 12) != 0, isa::FMA);
    bit(l1.ecx & (1 << 19) != 0, isa::SSE41);
    bit(l1.ecx & (1 << 20) != 0, isa::SSE42);
    bit(l1.ecx & (1 << 22) != 0, isa::MOVBE);
    bit(l1.ecx & (1 << 23) != 0, isa::POPCNT);
    bit(l1.ecx & (1 << 25) != 0, isa::AES);
    bit(l1.ecx & (1 << 28) != 0, isa::AVX);
    bit(l1.ecx & (1 << 29) != 0, isa::F16C);
    bit(l1.ecx & (1 << 30) != 0, isa::RDRAND);
    bit(l7.ebx & (1 << 3) != 0, isa::BMI1);
    bit(l7.ebx & (1 << 5) != 0, isa::AVX2);
    bit(l7.ebx & (1 << 8) != 0, isa::BMI2);
    bit(l7.ebx & (1 << 18) != 0, isa::RDSEED);
    bit(l7.ebx & (1 << 19) != 0, isa::ADX);
    bit(l7.ebx & (1 << 29) != 0, isa::SHA);
    bit(e1.ecx & (1 << 5) != 0, isa::LZCNT);
    m
}

/// Which checks and state an instruction needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// x87 arithmetic and data movement: #NM on EM or TS, #MF when an exception is pending.
    X87,
    /// MMX registers (also SSE instructions with an MMX operand): #UD on EM, #NM on TS.
    Mmx,
    /// Legacy-encoded SSE: #UD without CR4.OSFXSR.
    Sse,
    /// VEX-encoded vector instructions: #UD unless XCR0 enables SSE and AVX state.
    Avx,
    /// General-purpose only (BMI, ADX, POPCNT, CRC32, MOVBE, RDRAND).
    Gpr,
}

#[derive(Clone, Copy, Debug)]
struct MemOp {
    size: usize,
    read: bool,
    write: bool,
    /// Required alignment (1: none).
    align: u64,
}

#[derive(Clone, Copy)]
struct Plan {
    stub: Stub,
    class: Class,
    /// ISA bits the instruction needs.
    need: u64,
    /// Host GPR numbers loaded and stored; `gpr_map[h]` is the guest GPR host register
    /// `h` stands for.
    gpr_in: u16,
    gpr_out: u16,
    gpr_map: [u8; 16],
    vec_in: u16,
    vec_out: u16,
    x87: bool,
    mxcsr: bool,
    flags_out: u64,
    mem: Option<MemOp>,
}

/// Per-CPU state of the host-execution path: stubs by instruction, and their code.
pub(crate) struct HostExec {
    arena: Option<Arena>,
    /// By instruction (iced's equality ignores the address): looked up on every run, so
    /// with a fast hash rather than SipHash.
    plans: FxHashMap<Instruction, Option<Plan>>,
    /// Recently run plans by decode-time key (see [`key`]).
    front: Box<[Option<(Instruction, Plan)>]>,
    ctx: Box<Ctx>,
    /// CPUID generation the cached ISA bits belong to.
    isa_gen: u64,
    isa: u64,
}

impl std::fmt::Debug for HostExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostExec")
            .field("plans", &self.plans.len())
            .finish()
    }
}

impl Default for HostExec {
    fn default() -> Self {
        HostExec {
            arena: None,
            plans: FxHashMap::default(),
            front: vec![None; FRONT].into_boxed_slice(),
            // SAFETY: Ctx is plain integers and byte arrays; all zeroes is a valid value.
            ctx: unsafe { Box::new_zeroed().assume_init() },
            isa_gen: u64::MAX,
            isa: 0,
        }
    }
}

const ARENA_LEN: usize = 1 << 20;

/// Whether the host can run the instructions this module handles at all.
pub(crate) fn host_supported() -> bool {
    cfg!(target_arch = "x86_64")
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn host_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn host_avx() -> bool {
    false
}

fn gpr_num(r: Register) -> Option<usize> {
    if r.is_gpr() {
        Some(r.full_register() as usize - Register::RAX as usize)
    } else {
        None
    }
}

/// The register of the same width as `r` in GPR number `n`.
fn gpr_like(r: Register, n: usize) -> Option<Register> {
    let base = match r.size() {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    if r.size() == 1 && n >= 4 {
        // SPL..R15L come after AH..BH in iced's numbering.
        return nth_reg(Register::SPL, n - 4);
    }
    nth_reg(base, n)
}

fn vec_num(r: Register) -> Option<usize> {
    if r.is_xmm() && (r as usize) < Register::XMM16 as usize {
        Some(r as usize - Register::XMM0 as usize)
    } else if r.is_ymm() && (r as usize) < Register::YMM16 as usize {
        Some(r as usize - Register::YMM0 as usize)
    } else if r.is_zmm() && (r as usize) < Register::ZMM16 as usize {
        // iced names the whole register a VEX instruction zeroes the top of.
        Some(r as usize - Register::ZMM0 as usize)
    } else {
        None
    }
}

/// Mnemonics this module never runs: control flow, system state, implicit memory, or
/// state the emulator keeps itself.
fn refused(m: M) -> bool {
    matches!(
        m,
        M::Maskmovq
            | M::Maskmovdqu
            | M::Vmaskmovdqu
            | M::Vzeroupper
            | M::Vzeroall
            | M::Vldmxcsr
            | M::Vstmxcsr
            | M::Ldmxcsr
            | M::Stmxcsr
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fldcw
            | M::Fnstcw
            | M::Fstcw
            | M::Fninit
            | M::Finit
            | M::Fnclex
            | M::Fclex
            | M::Fnstsw
            | M::Fstsw
            | M::Wait
            | M::Femms
            | M::Fnsetpm
            | M::Fsetpm
            | M::Fneni
            | M::Feni
            | M::Fndisi
            | M::Fdisi
            | M::Frstpm
            | M::Fnstdw
            | M::Fnstsg
    )
}

/// Memory operands whose alignment the instruction demands (#GP otherwise).
fn alignment(ins: &Instruction, size: usize, class: Class) -> u64 {
    let m = ins.mnemonic();
    match class {
        Class::Avx => {
            if matches!(
                m,
                M::Vmovaps
                    | M::Vmovapd
                    | M::Vmovdqa
                    | M::Vmovntps
                    | M::Vmovntpd
                    | M::Vmovntdq
                    | M::Vmovntdqa
            ) {
                size as u64
            } else {
                1
            }
        }
        Class::Sse if size == 16 => {
            if matches!(
                m,
                M::Movups
                    | M::Movupd
                    | M::Movdqu
                    | M::Lddqu
                    | M::Pcmpestri
                    | M::Pcmpestri64
                    | M::Pcmpestrm
                    | M::Pcmpestrm64
                    | M::Pcmpistri
                    | M::Pcmpistrm
            ) {
                1
            } else {
                16
            }
        }
        // CVTPD2PI and CVTTPD2PI read an m128 like legacy SSE does.
        Class::Mmx if size == 16 => 16,
        _ => 1,
    }
}

fn plan(ins: &Instruction, arena: &mut Arena) -> Option<Plan> {
    let m = ins.mnemonic();
    if refused(m) || ins.is_invalid() {
        return None;
    }
    if !matches!(ins.encoding(), EncodingKind::Legacy | EncodingKind::VEX) {
        return None;
    }
    let need = isa_need(ins)?;
    let mut info = InstructionInfoFactory::new();
    let used: Vec<_> = info.info(ins).used_registers().to_vec();
    let mut mem_ops = 0;
    let mut x87 = false;
    let mut vec = false;
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register => {
                let r = ins.op_register(i);
                if r.is_mm() || r.is_st() {
                    x87 = true;
                } else if r.is_xmm() || r.is_ymm() {
                    vec = true;
                } else if !r.is_gpr() {
                    return None;
                }
            }
            OpKind::Memory => mem_ops += 1,
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return None,
        }
    }
    if mem_ops > 1 || ins.is_vsib() {
        return None;
    }
    for u in &used {
        let r = u.register();
        if r.is_st() || r.is_mm() {
            x87 = true;
        } else if r.is_xmm() || r.is_ymm() || r.is_zmm() {
            vec = true;
            vec_num(r)?;
        } else if !(r.is_gpr() || r == Register::None || r.is_segment_register()) {
            // Control, mask or other registers: not a pure computation. (Segment registers
            // show up as the memory operand's segment, which the emulator applies.)
            return None;
        }
    }
    // FISTTP is an x87 instruction that CPUID lists under SSE3 only.
    let fpu = need & isa::FPU != 0 || m == M::Fisttp;
    x87 |= fpu || need & isa::MMX != 0;
    let class = if ins.encoding() == EncodingKind::VEX {
        // VCVTSD2SI r, m64 and the like name no vector register but are AVX all the same.
        if vec || need & (isa::AVX | isa::AVX2 | isa::FMA | isa::F16C) != 0 {
            Class::Avx
        } else {
            Class::Gpr
        }
    } else if fpu {
        Class::X87
    } else if x87 {
        Class::Mmx
    } else if vec {
        Class::Sse
    } else {
        Class::Gpr
    };
    if class == Class::Gpr
        && (need == 0
            || need
                & !(isa::POPCNT
                    | isa::BMI1
                    | isa::BMI2
                    | isa::ADX
                    | isa::MOVBE
                    | isa::SSE42
                    | isa::RDRAND
                    | isa::RDSEED
                    | isa::LZCNT)
                != 0)
    {
        return None;
    }
    if (class == Class::Avx || vec) && !host_avx() && ins.encoding() == EncodingKind::VEX {
        return None;
    }

    // Host registers: the guest's own numbers, except RSP (the stub's stack) and the
    // context pointer, which take GPR numbers the instruction does not touch.
    let touched: u16 = used
        .iter()
        .filter_map(|u| gpr_num(u.register()))
        .fold(0, |a, n| a | (1 << n));
    // AH, CH, DH and BH cannot be encoded with a REX prefix, which R8-R15 need.
    let high_byte = used.iter().any(|u| {
        matches!(
            u.register(),
            Register::AH | Register::CH | Register::DH | Register::BH
        )
    });
    let mut free = (0..16usize)
        .rev()
        .filter(|&n| n != 4 && touched & (1 << n) == 0 && (!high_byte || n < 8));
    let ptr = free.next()?;
    let rsp_to = if touched & (1 << 4) != 0 {
        Some(free.next()?)
    } else {
        None
    };

    let mut r = *ins;
    let mut mem = None;
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register => {
                let reg = ins.op_register(i);
                if let (Some(4), Some(to)) = (gpr_num(reg), rsp_to) {
                    r.set_op_register(i, gpr_like(reg, to)?);
                }
            }
            OpKind::Memory => {
                let size = ins.memory_size().size();
                if size == 0 || size > MEM_MAX {
                    return None;
                }
                let (mut read, mut write) = (false, false);
                for u in info.info(ins).used_memory() {
                    match u.access() {
                        OpAccess::Read | OpAccess::CondRead => read = true,
                        OpAccess::Write => write = true,
                        // A conditional write keeps what it does not write: read it first.
                        OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => {
                            read = true;
                            write = true
                        }
                        _ => {}
                    }
                }
                if !read && !write {
                    // LEA-like forms do not belong here.
                    return None;
                }
                // Masked stores leave the elements their mask clears as they were, though
                // iced reports a plain write: read them first so the write-back keeps them.
                if matches!(
                    m,
                    M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq
                ) {
                    read = true;
                }
                // An x87 store that raises an unmasked exception may store nothing.
                if class == Class::X87 && write {
                    read = true;
                }
                mem = Some(MemOp {
                    size,
                    read,
                    write,
                    align: alignment(ins, size, class),
                });
                r.set_memory_base(gpr_like(Register::RAX, ptr)?);
                r.set_memory_index(Register::None);
                r.set_memory_index_scale(1);
                r.set_memory_displacement64(OFF_MEM as u64);
                r.set_memory_displ_size(8);
                r.set_segment_prefix(Register::None);
            }
            _ => {}
        }
    }

    // What the rewritten instruction reads and writes, apart from the context pointer.
    let used2: Vec<_> = info.info(&r).used_registers().to_vec();
    let (mut gpr_in, mut gpr_out, mut vec_in, mut vec_out) = (0u16, 0u16, 0u16, 0u16);
    for u in &used2 {
        let reg = u.register();
        let writes = matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if let Some(n) = gpr_num(reg) {
            if n == ptr {
                continue;
            }
            if n == 4 {
                return None;
            }
            gpr_in |= 1 << n;
            if writes {
                gpr_out |= 1 << n;
            }
        } else if let Some(n) = vec_num(reg) {
            vec_in |= 1 << n;
            if writes {
                vec_out |= 1 << n;
            }
        }
    }
    let mut gpr_map = [0u8; 16];
    for (h, g) in gpr_map.iter_mut().enumerate() {
        *g = h as u8;
    }
    if let Some(to) = rsp_to {
        gpr_map[to] = 4;
    }
    let mxcsr = class != Class::Gpr;
    let flags_out = rflags_bits(ins.rflags_modified());
    let code = stub_code(&r, ptr, gpr_in, gpr_out, vec_in, vec_out, x87, mxcsr)?;
    let at = arena.put(&code)?;
    // SAFETY: `at` holds the complete function just assembled for this address.
    let stub: Stub = unsafe { std::mem::transmute::<*mut u8, Stub>(at) };
    Some(Plan {
        stub,
        class,
        need,
        gpr_in,
        gpr_out,
        gpr_map,
        vec_in,
        vec_out,
        x87,
        mxcsr,
        flags_out,
        mem,
    })
}

fn rflags_bits(iced: u32) -> u64 {
    use iced_x86::RflagsBits as B;
    let mut f = 0;
    for (b, v) in [
        (B::CF, 1u64),
        (B::PF, 1 << 2),
        (B::AF, 1 << 4),
        (B::ZF, 1 << 6),
        (B::SF, 1 << 7),
        (B::OF, 1 << 11),
    ] {
        if iced & b != 0 {
            f |= v;
        }
    }
    f
}

fn nth_reg(base: Register, n: usize) -> Option<Register> {
    Register::try_from(base as usize + n).ok()
}

#[allow(clippy::too_many_arguments)]
fn stub_code(
    ins: &Instruction,
    ptr: usize,
    gpr_in: u16,
    gpr_out: u16,
    vec_in: u16,
    vec_out: u16,
    x87: bool,
    mxcsr: bool,
) -> Option<Vec<u8>> {
    let g = |n: usize| gpr_like(Register::RAX, n).and_then(asm::get_gpr64);
    let ymm = |n: usize| nth_reg(Register::YMM0, n).and_then(asm::get_ymm);
    let xmm = |n: usize| nth_reg(Register::XMM0, n).and_then(asm::get_xmm);
    let p = g(ptr)?;
    let avx = host_avx();
    let mut a = CodeAssembler::new(64).ok()?;
    // Only the callee-saved registers the stub uses are saved, and RFLAGS goes through
    // the stack (POPFQ is slow) only for an instruction that reads or writes flags.
    let used = gpr_in | gpr_out | (1 << ptr);
    let saved: Vec<_> = [
        (3, asm::rbx),
        (5, asm::rbp),
        (12, asm::r12),
        (13, asm::r13),
        (14, asm::r14),
        (15, asm::r15),
    ]
    .into_iter()
    .filter(|(n, _)| used & (1 << n) != 0)
    .map(|(_, r)| r)
    .collect();
    let flags_in = ins.rflags_read() != 0;
    let flags_out = ins.rflags_modified() != 0;
    for &r in &saved {
        a.push(r).ok()?;
    }
    a.mov(p, asm::rdi).ok()?;
    if mxcsr {
        a.stmxcsr(asm::dword_ptr(p + OFF_HOST_MXCSR)).ok()?;
    }
    if x87 {
        // Before LDMXCSR: FXRSTOR loads MXCSR too.
        a.fxrstor64(asm::ptr(p + OFF_FX)).ok()?;
    }
    if mxcsr {
        a.ldmxcsr(asm::dword_ptr(p + OFF_MXCSR)).ok()?;
    }
    for n in (0..16usize).filter(|n| vec_in & (1 << n) != 0) {
        let off = OFF_YMM + 32 * n as i32;
        if avx {
            a.vmovdqu(ymm(n)?, asm::ymmword_ptr(p + off)).ok()?;
        } else {
            a.movdqu(xmm(n)?, asm::xmmword_ptr(p + off)).ok()?;
        }
    }
    for n in (0..16usize).filter(|n| gpr_in & (1 << n) != 0) {
        a.mov(g(n)?, asm::qword_ptr(p + (OFF_GPR + 8 * n as i32)))
            .ok()?;
    }
    if flags_in {
        a.push(asm::qword_ptr(p + OFF_FLAGS)).ok()?;
        a.popfq().ok()?;
    }
    a.add_instruction(*ins).ok()?;
    if flags_out {
        a.pushfq().ok()?;
        a.pop(asm::qword_ptr(p + OFF_FLAGS)).ok()?;
    }
    for n in (0..16usize).filter(|n| gpr_out & (1 << n) != 0) {
        a.mov(asm::qword_ptr(p + (OFF_GPR + 8 * n as i32)), g(n)?)
            .ok()?;
    }
    for n in (0..16usize).filter(|n| vec_out & (1 << n) != 0) {
        let off = OFF_YMM + 32 * n as i32;
        if avx {
            a.vmovdqu(asm::ymmword_ptr(p + off), ymm(n)?).ok()?;
        } else {
            a.movdqu(asm::xmmword_ptr(p + off), xmm(n)?).ok()?;
        }
    }
    if mxcsr {
        a.stmxcsr(asm::dword_ptr(p + OFF_MXCSR)).ok()?;
    }
    if x87 {
        a.fxsave64(asm::ptr(p + OFF_FX)).ok()?;
        // The host's own x87 state as the ABI wants it: empty stack, default control.
        a.fninit().ok()?;
    }
    if mxcsr {
        a.ldmxcsr(asm::dword_ptr(p + OFF_HOST_MXCSR)).ok()?;
    }
    if avx && vec_in != 0 {
        a.vzeroupper().ok()?;
    }
    for &r in saved.iter().rev() {
        a.pop(r).ok()?;
    }
    a.ret().ok()?;
    // Position-independent: no operand is RIP-relative.
    a.assemble(0).ok()
}

/// The full x87 tag word as FSTENV/FSAVE store it, classifying each valid register.
pub(crate) fn full_tag_word(f: &crate::state::FpuState) -> u16 {
    let top = (f.fsw >> 11) & 7;
    let mut t = 0u16;
    for phys in 0..8u16 {
        let tag = if f.ftw & (1 << phys) == 0 {
            3
        } else {
            let st = usize::from((phys + 8 - top) & 7);
            let v = f.st[st];
            let exp = ((v >> 64) & 0x7fff) as u16;
            let mant = v as u64;
            if exp == 0x7fff {
                2
            } else if exp == 0 {
                if mant == 0 {
                    1
                } else {
                    2
                }
            } else if mant >> 63 == 0 {
                2
            } else {
                0
            }
        };
        t |= tag << (2 * phys);
    }
    t
}

/// MXCSR flags: the exceptions found before computing (invalid, denormal, divide by
/// zero), and underflow.
const MX_PRE: u32 = 0x7;
const MX_UE: u32 = 0x10;
const MX_FTZ: u32 = 1 << 15;

/// Loads the context from the guest state and `mem_in`, and runs the plan's stub: SIMD
/// exceptions masked with no flag raised yet (so what the instruction raises shows),
/// flush-to-zero if `ftz`; x87 exceptions as the guest masks them.
fn run_stub(cpu: &mut Core, plan: &Plan, mem_in: &[u8; MEM_MAX], ftz: bool) {
    let s = &cpu.s;
    let ctx = &mut cpu.hostexec.ctx;
    if let Some(mo) = plan.mem {
        if mo.read {
            ctx.mem[..mo.size].copy_from_slice(&mem_in[..mo.size]);
        }
    }
    if plan.x87 {
        let f = &s.fpu;
        let fx = &mut ctx.fx;
        // FSW.ES is clear (the caller raised #MF otherwise). An exception whose flag is
        // already set stays masked, so the host never finds one pending.
        fx[0..2].copy_from_slice(&(f.fcw | (f.fsw & 0x3f)).to_le_bytes());
        fx[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        fx[4] = f.ftw;
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        for (i, st) in f.st.iter().enumerate() {
            let o = 32 + i * 16;
            fx[o..o + 16].copy_from_slice(&(st & ((1u128 << 80) - 1)).to_le_bytes());
        }
    }
    for n in 0..16 {
        if plan.vec_in & (1 << n) != 0 {
            ctx.ymm[n] = [s.fpu.xmm[n], s.fpu.ymm_hi[n]];
        }
    }
    for h in 0..16 {
        if plan.gpr_in & (1 << h) != 0 {
            ctx.gpr[h] = s.gpr[usize::from(plan.gpr_map[h])];
        }
    }
    ctx.flags = (s.rflags & STATUS) | HOST_FLAGS;
    ctx.mxcsr = ((s.fpu.mxcsr | 0x1f80) & !0x3f) | if ftz { MX_FTZ } else { 0 };
    let ctx_ptr: *mut Ctx = &mut **ctx;
    // SAFETY: the stub was assembled by `plan` for exactly this context layout: it saves
    // and restores the callee-saved registers, the host MXCSR and an empty x87 stack,
    // touches no memory outside `*ctx_ptr`, and runs one instruction accepted by `plan`
    // (no control flow, no system state, its one memory operand rewritten to `ctx.mem`)
    // with every SIMD exception masked. An x87 exception it raises unmasked only sets
    // FSW.ES, which FXSAVE stores without waiting and FNINIT clears, so nothing traps.
    unsafe { (plan.stub)(ctx_ptr) };
}

impl Core {
    /// #MF for a pending unmasked x87 exception (FSW.ES), before a waiting x87 or MMX
    /// instruction runs.
    pub(crate) fn fpu_pending(&self) -> Result<()> {
        if self.s.fpu.fsw & 0x80 != 0 {
            return Err(Fault::new(vector::MF));
        }
        Ok(())
    }

    pub(crate) fn hostexec_isa(&mut self) -> u64 {
        let gen = self.cpuid.generation();
        if self.hostexec.isa_gen != gen {
            self.hostexec.isa = isa_of(&self.cpuid);
            self.hostexec.isa_gen = gen;
        }
        self.hostexec.isa
    }
}

/// A vector instruction compiled code may run as itself (see `jit`): what it needs and
/// which vector registers it reads (at 128 or 256 bits) and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JitVector {
    /// VEX-encoded: needs the AVX state enabled, and zeroes the upper bits it writes.
    pub(crate) vex: bool,
    /// The memory operand's alignment (1: none).
    pub(crate) align: u64,
    /// Per vector register: 0 not read, 1 bits 127:0 read, 2 all 256 bits read.
    pub(crate) read: [u8; 16],
    pub(crate) write: u16,
}

/// Instructions whose result depends on nothing but their operands: integer SIMD, data
/// movement, bitwise logic, shuffles, AES and SHA. Floating-point arithmetic, compares
/// and conversions read MXCSR and raise its flags, which compiled code does not model.
fn mxcsr_free(m: M) -> bool {
    // iced's names, lower case, without the VEX form's leading 'v'.
    let name = format!("{m:?}").to_ascii_lowercase();
    let n = match ins_is_vex_name(&name) {
        true => &name[1..],
        false => &name[..],
    };
    (n.starts_with('p') && !n.starts_with("pf") && !n.starts_with("pi2f"))
        || n.starts_with("aes")
        || n.starts_with("sha")
        || matches!(
            n,
            "movdqa"
                | "movdqu"
                | "movaps"
                | "movups"
                | "movapd"
                | "movupd"
                | "movd"
                | "movq"
                | "movss"
                | "movsd"
                | "movhps"
                | "movlps"
                | "movhpd"
                | "movlpd"
                | "movhlps"
                | "movlhps"
                | "movmskps"
                | "movmskpd"
                | "movddup"
                | "movshdup"
                | "movsldup"
                | "lddqu"
                | "movntdq"
                | "movntps"
                | "movntpd"
                | "movntdqa"
                | "andps"
                | "andpd"
                | "andnps"
                | "andnpd"
                | "orps"
                | "orpd"
                | "xorps"
                | "xorpd"
                | "shufps"
                | "shufpd"
                | "unpcklps"
                | "unpckhps"
                | "unpcklpd"
                | "unpckhpd"
                | "blendps"
                | "blendpd"
                | "blendvps"
                | "blendvpd"
                | "insertps"
                | "extractps"
                | "broadcastss"
                | "broadcastsd"
                | "broadcastf128"
                | "broadcasti128"
                | "perm2f128"
                | "perm2i128"
                | "permilps"
                | "permilpd"
                | "permq"
                | "permd"
                | "permps"
                | "permpd"
                | "insertf128"
                | "inserti128"
                | "extractf128"
                | "extracti128"
                | "testps"
                | "testpd"
        )
}

/// Whether an iced mnemonic name (lower case) is a VEX form: `v` and then a legacy name.
fn ins_is_vex_name(name: &str) -> bool {
    name.len() > 1 && name.starts_with('v')
}

/// Whether compiled code may run `ins` as itself: a legacy SSE or VEX instruction on
/// XMM/YMM0-15, general registers and at most one plain memory operand, whose result does
/// not depend on MXCSR, that the CPU model `isa` has and the host runs.
pub(crate) fn jit_vector(ins: &Instruction, isa: u64) -> Option<JitVector> {
    let m = ins.mnemonic();
    if refused(m) || ins.is_invalid() || ins.is_vsib() || !mxcsr_free(m) {
        return None;
    }
    // Masked loads and stores skip the faults of the elements they leave out.
    if matches!(
        m,
        M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq
    ) {
        return None;
    }
    let vex = match ins.encoding() {
        EncodingKind::Legacy => false,
        EncodingKind::VEX => true,
        _ => return None,
    };
    if vex && !host_avx() {
        return None;
    }
    let need = isa_need(ins)?;
    if need & !isa != 0 || need & (isa::FPU | isa::MMX) != 0 {
        return None;
    }
    let mut vec = false;
    let mut mem_size = 0;
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register => {
                let r = ins.op_register(i);
                if r.is_xmm() || r.is_ymm() {
                    vec = true;
                } else if !r.is_gpr() {
                    return None;
                }
            }
            OpKind::Memory => mem_size = ins.memory_size().size(),
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return None,
        }
    }
    if !vec || mem_size > 32 {
        return None;
    }
    let mut info = InstructionInfoFactory::new();
    let mut read = [0u8; 16];
    let mut write = 0u16;
    for u in info.info(ins).used_registers() {
        let r = u.register();
        if r.is_xmm() || r.is_ymm() || r.is_zmm() {
            let n = vec_num(r)?;
            if matches!(
                u.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            ) {
                let level = if r.is_xmm() { 1 } else { 2 };
                read[n] = read[n].max(level);
            }
            if matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                write |= 1 << n;
                // Legacy SSE keeps bits 255:128, and some forms (MOVSS, MOVLPS, PINSR*)
                // more: the register is loaded first, so what the instruction keeps is the
                // guest's. VEX zeroes whatever it does not write, except under a condition.
                if !vex || u.access() == OpAccess::CondWrite {
                    read[n] = read[n].max(if vex { 2 } else { 1 });
                }
            }
        } else if !(r.is_gpr() || r == Register::None || r.is_segment_register()) {
            return None;
        }
    }
    let class = if vex { Class::Avx } else { Class::Sse };
    Some(JitVector {
        vex,
        align: if mem_size > 0 {
            alignment(ins, mem_size, class)
        } else {
            1
        },
        read,
        write,
    })
}

/// Whether `ins` goes straight to [`exec`]: VEX encodings, x87 arithmetic and anything
/// with an MMX or x87 register. (Legacy SSE the interpreter does not implement reaches
/// [`exec`] through `sse_fp`.)
pub(crate) fn routes(ins: &Instruction) -> bool {
    ins.encoding() == EncodingKind::VEX
        || ins
            .cpuid_features()
            .iter()
            .any(|f| matches!(f, F::FPU | F::FPU287 | F::FPU387 | F::MMX))
        || (0..ins.op_count()).any(|i| {
            ins.op_kind(i) == OpKind::Register && {
                let r = ins.op_register(i);
                r.is_mm() || r.is_st()
            }
        })
        || ins.cpuid_features().iter().any(|f| {
            matches!(
                f,
                F::SSE3
                    | F::SSSE3
                    | F::SSE4_1
                    | F::SSE4_2
                    | F::AES
                    | F::PCLMULQDQ
                    | F::SHA
                    | F::POPCNT
                    | F::MOVBE
                    | F::ADX
                    | F::RDRAND
                    | F::RDSEED
            )
        })
}

/// Slots of the front cache of plans, looked up by a key computed when the instruction is
/// decoded, so the common case hashes nothing.
const FRONT: usize = 1024;

/// The decode-time key of an instruction [`routes`] sends here.
pub(crate) fn key(ins: &Instruction) -> u32 {
    use std::hash::BuildHasher;
    (rustc_hash::FxBuildHasher.hash_one(ins) >> 20) as u32
}

/// [`exec`] for a decoded instruction, with its decode-time key.
pub(crate) fn exec_insn(cpu: &mut Core, p: &mut dyn Platform, insn: &Insn) -> Result<()> {
    exec_keyed(cpu, p, &insn.instr, Some(insn.host_key))
}

/// Runs `ins` on the host; #UD for what this module does not run or the model lacks.
pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    exec_keyed(cpu, p, ins, None)
}

fn exec_keyed(
    cpu: &mut Core,
    p: &mut dyn Platform,
    ins: &Instruction,
    key: Option<u32>,
) -> Result<()> {
    if !host_supported() {
        return Err(Fault::ud());
    }
    let isa = cpu.hostexec_isa();
    let he = &mut cpu.hostexec;
    let slot = key.map(|k| k as usize % FRONT);
    let front = slot.and_then(|s| match &he.front[s] {
        Some((i, pl)) if i == ins => Some(*pl),
        _ => None,
    });
    let plan = match front.map(Some).or_else(|| he.plans.get(ins).copied()) {
        Some(p) => p,
        None => {
            if he.plans.len() > 65536 {
                he.plans.clear();
                he.front.fill(None);
                if let Some(a) = he.arena.as_mut() {
                    a.reset();
                }
            }
            if he.arena.is_none() {
                he.arena = Arena::new(ARENA_LEN);
            }
            let Some(arena) = he.arena.as_mut() else {
                return Err(Fault::ud());
            };
            let mut pl = plan(ins, arena);
            if pl.is_none() && arena.room() < 4096 {
                // Full: start again (dropping every stub) and retry once.
                he.plans.clear();
                he.front.fill(None);
                arena.reset();
                pl = plan(ins, arena);
            }
            he.plans.insert(*ins, pl);
            pl
        }
    };
    let Some(plan) = plan else {
        return Err(Fault::ud());
    };
    if let (Some(s), None) = (slot, front) {
        he.front[s] = Some((*ins, plan));
    }
    if plan.need & !isa != 0 {
        return Err(Fault::ud());
    }
    let s = &cpu.s;
    match plan.class {
        Class::X87 => {
            cpu.fpu_check()?;
            cpu.fpu_pending()?;
        }
        Class::Mmx => {
            if s.cr0 & CR0_EM != 0 {
                return Err(Fault::ud());
            }
            if s.cr0 & CR0_TS != 0 {
                return Err(Fault::nm());
            }
            if plan.vec_in != 0 && s.cr4 & CR4_OSFXSR == 0 {
                return Err(Fault::ud());
            }
            cpu.fpu_pending()?;
        }
        Class::Sse => cpu.sse_check()?,
        Class::Avx => cpu.avx_check()?,
        Class::Gpr => {}
    }

    // The memory operand: checked and read before anything runs.
    let mut lin = 0;
    let mut off = 0;
    let mut mem_in = [0u8; MEM_MAX];
    if let Some(mo) = plan.mem {
        off = ea(cpu, ins);
        if off & (mo.align - 1) != 0 {
            return Err(Fault::gp0());
        }
        lin = cpu.seg_lin(mem_seg(ins), off, mo.size as u32)?;
        if mo.read {
            let user = cpu.user();
            cpu.read_lin_slow(
                p,
                lin,
                &mut mem_in[..mo.size],
                user,
                crate::mmu::Access::Read,
            )?;
        }
    }

    let guest_mxcsr = cpu.s.fpu.mxcsr;
    // With underflow unmasked, a tiny result raises #XM even when it is exact, which a
    // masked run does not flag; with flush-to-zero it does (and changes nothing else).
    let tiny_check = plan.mxcsr && guest_mxcsr & (MX_UE << 7) == 0;
    run_stub(cpu, &plan, &mem_in, tiny_check);

    // SIMD floating-point exceptions the guest left unmasked: #XM, nothing written. An
    // unmasked exception found before computing (invalid, denormal, divide by zero)
    // stops the instruction with only those flags set; one found after it sets them all.
    if plan.mxcsr {
        let mut raised = cpu.hostexec.ctx.mxcsr & 0x3f;
        let masks = (guest_mxcsr >> 7) & 0x3f;
        let mut trap = raised & !masks != 0;
        if raised & !masks & MX_PRE != 0 {
            raised &= MX_PRE;
        } else if tiny_check && raised & MX_UE != 0 {
            // A tiny result. The operands' exceptions as this run found them (a flushed
            // intermediate of DPPS/DPPD is no denormal operand to its next step, as the
            // host stops at the underflow); overflow and precision as a run without
            // flush-to-zero raises them.
            let pre = raised & MX_PRE;
            run_stub(cpu, &plan, &mem_in, false);
            raised = pre | (cpu.hostexec.ctx.mxcsr & 0x3f & !MX_PRE) | MX_UE;
            trap = true;
        }
        if trap {
            cpu.s.fpu.mxcsr |= raised;
            if plan.class == Class::Mmx {
                // The switch to MMX operation (TOP 0, every register valid) happens all
                // the same, as on the host.
                let fx = &cpu.hostexec.ctx.fx;
                let f = &mut cpu.s.fpu;
                let fsw = u16::from_le_bytes([fx[2], fx[3]]);
                super::x87::set_top(f, (fsw >> 11) & 7);
                f.ftw = fx[4];
            }
            return Err(if cpu.s.cr4 & CR4_OSXMMEXCPT != 0 {
                Fault::new(vector::XM)
            } else {
                Fault::ud()
            });
        }
    }
    let ctx = &cpu.hostexec.ctx;
    // x87 exceptions ran unmasked as the guest has them (they do not trap on the host
    // until a waiting instruction, and the stub ends with FXSAVE and FNINIT): FSW, the
    // registers and memory are the host's, ES and B included when one was raised.
    let mut x87_out = None;
    let mut store = plan.mem.is_some_and(|m| m.write);
    if plan.x87 {
        let fx = &ctx.fx;
        let fsw = u16::from_le_bytes([fx[2], fx[3]]);
        if let (Some(mo), true) = (plan.mem, fsw & 0x80 != 0 && plan.class == Class::X87) {
            // A store the exception suppressed: nothing to write.
            store &= ctx.mem[..mo.size] != mem_in[..mo.size];
        }
        x87_out = Some((fsw, fx[4]));
    }
    if let (Some(mo), true) = (plan.mem, store) {
        let user = cpu.user();
        let buf = cpu.hostexec.ctx.mem;
        cpu.write_lin(p, lin, &buf[..mo.size], user)?;
    }

    // Commit.
    let ctx = &cpu.hostexec.ctx;
    let s = &mut cpu.s;
    for h in 0..16 {
        if plan.gpr_out & (1 << h) != 0 {
            s.gpr[usize::from(plan.gpr_map[h])] = ctx.gpr[h];
        }
    }
    for n in 0..16 {
        if plan.vec_out & (1 << n) != 0 {
            s.fpu.xmm[n] = ctx.ymm[n][0];
            s.fpu.ymm_hi[n] = ctx.ymm[n][1];
        }
    }
    s.rflags = (s.rflags & !plan.flags_out) | (ctx.flags & plan.flags_out);
    if plan.mxcsr {
        s.fpu.mxcsr = guest_mxcsr | (ctx.mxcsr & 0x3f);
    }
    if let Some((fsw, ftw)) = x87_out {
        let fx = &ctx.fx;
        let f = &mut s.fpu;
        f.fsw = fsw;
        f.ftw = ftw;
        for i in 0..8 {
            let o = 32 + i * 16;
            let mut v = [0u8; 16];
            v[..10].copy_from_slice(&fx[o..o + 10]);
            f.st[i] = u128::from_le_bytes(v);
        }
        if plan.class == Class::X87 {
            f.fip = ins.ip();
            if plan.mem.is_some() {
                f.fdp = off;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    #[test]
    fn plans_vmovdqu() {
        let bytes = [0xc5, 0xfe, 0x6f, 0x06];
        let ins = Decoder::with_ip(64, &bytes, 0x1000, DecoderOptions::NONE).decode();
        let mut arena = Arena::new(1 << 16).unwrap();

        for &f in ins.cpuid_features() {
            assert!(isa_bit(f).is_some(), "{f:?}");
        }
        assert_eq!(gpr_like(Register::RAX, 15), Some(Register::R15));
        let mut r = ins;
        r.set_memory_base(Register::R15);
        r.set_memory_displacement64(OFF_MEM as u64);
        r.set_memory_displ_size(8);
        assert!(stub_code(&r, 15, 0, 0, 1, 1, false, true).is_some());
        let p = plan(&ins, &mut arena);
        assert!(p.is_some());
    }
}
