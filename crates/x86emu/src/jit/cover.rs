//! Which guest instructions compiled code covers, and how the registers and the memory
//! operand of one map to the host (see the module documentation).

use std::mem::offset_of;

use iced_x86::{
    Code, CodeSize, Instruction, InstructionInfoFactory, Mnemonic as M, OpAccess, OpKind, Register,
};

use super::Ctx;
use crate::exec::fast::is_imm;
use crate::exec::hostexec::{host_avx, isa, isa_need, jit_vector, JitVector};
use crate::exec::is_cmov_or_setcc;

/// Host registers guest values and scratch values may use: all but RSP (the host stack)
/// and R15 (the guest register state).
pub(super) const POOL: [Register; 14] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSI,
    Register::RDI,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
];

pub(super) const RSP: usize = 4;
pub(super) const R15: usize = 15;

/// Index 0..16 of a general-purpose register's full form.
pub(super) fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    full.is_gpr64()
        .then(|| full as usize - Register::RAX as usize)
}

/// `full` (a 64-bit register) at the size of `like`.
pub(super) fn sized(full: Register, like: Register) -> Option<Register> {
    let i = full as usize - Register::RAX as usize;
    let base = match like.size() {
        8 => Register::RAX,
        4 => Register::EAX,
        2 => Register::AX,
        // AL..BL, SPL..DIL, R8L..R15L are contiguous from AL except the AH..BH hole.
        1 => {
            let r = if i < 4 {
                Register::AL as usize + i
            } else {
                Register::SPL as usize + (i - 4)
            };
            return reg_from(r);
        }
        _ => return None,
    };
    reg_from(base as usize + i)
}

fn reg_from(n: usize) -> Option<Register> {
    Register::try_from(n).ok()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Runs as itself with host registers.
    Native,
    /// Only the address computation.
    Lea,
    Nop,
    /// The near `Jcc`/`JMP` that ends the block.
    Branch,
    /// 64-bit stack operations; `Call` and `Ret` only at the block end.
    Push,
    /// PUSH m64.
    PushMem,
    Pop,
    Leave,
    Call,
    Ret,
    /// JMP/CALL r/m64 ending the block: the target goes through the TLB and the block
    /// cache inline, as after a RET.
    IndJmp,
    IndCall,
    /// DIV or IDIV of RDX:RAX or EDX:EAX, after a check that it cannot raise #DE (for
    /// IDIV: a sign-extended dividend, as after CQO/CDQ, a divisor other than 0 and, with
    /// the most negative dividend, other than -1; anything else is the interpreter's).
    Div,
    /// BT/BTS/BTR/BTC of a memory bit string at a register offset: the address moves by
    /// the offset's high bits, the host instruction gets the low ones.
    BitMem,
    /// An SSE/AVX instruction that runs as itself on host XMM/YMM registers.
    Vector(JitVector),
    /// VZEROUPPER.
    Vzeroupper,
    /// PUSHFQ: the status flags from the host's, the others from the state.
    PushFlags,
    /// CLI where CPL <= IOPL (else the interpreter raises #GP).
    Cli,
    /// STI where CPL <= IOPL and no interrupt waits for the window (else the interpreter
    /// does it); never the block's last instruction (see `decode_into`), so the one after
    /// it runs before any interrupt, as STI's shadow wants.
    Sti,
    /// SWAPGS at CPL0.
    Swapgs,
    /// CLD and STD: DF lives in the state's RFLAGS, never in the host's.
    Cld,
    Std,
    /// RDTSC where it may run (else the interpreter raises #GP): a call of the CPU's
    /// clock. RDTSCP also loads ECX from IA32_TSC_AUX (Linux's clock reads use it where
    /// the CPU has it: every kvmclock read of a guest with more than one vCPU).
    Rdtsc,
    Rdtscp,
    /// PAUSE: counted, as the interpreter counts it; the code leaves before the one that
    /// completes a spin (`PAUSE_SPIN`), so that `run` returns `Paused`. A spin-wait loop
    /// (`csd_lock_wait`, `mutex_spin_on_owner`) then runs compiled between its yields.
    Pause,
    /// REP STOSB/STOSQ with 64-bit addresses (the page check is at run time).
    RepStos,
    /// REP MOVSB/MOVSQ with 64-bit addresses and no segment override (likewise).
    RepMovs,
    /// One MOVS (no REP) of 1, 2, 4 or 8 bytes, through the TLB like any memory operand
    /// (a byte-copy loop's body: GRUB's `memmove`).
    Movs,
    /// One STOS (no REP).
    Stos,
}

/// Integer instructions whose host execution at CPL3 is the guest's: no privileged
/// effect, no fault besides memory (handled before them), no implicit stack or string
/// access, nothing the guest's CPUID does not advertise.
fn runs_natively(ins: &Instruction, model: u64) -> bool {
    let m = ins.mnemonic();
    if matches!(
        m,
        M::Andn
            | M::Bextr
            | M::Blsi
            | M::Blsmsk
            | M::Blsr
            | M::Bzhi
            | M::Tzcnt
            | M::Lzcnt
            | M::Popcnt
            | M::Pdep
            | M::Pext
            | M::Rorx
            | M::Sarx
            | M::Shlx
            | M::Shrx
            | M::Mulx
            | M::Adcx
            | M::Adox
            | M::Movbe
            | M::Crc32
    ) {
        // Extensions of the general-purpose ISA: only where the CPU model has them (the
        // model is a subset of the host's), else the interpreter raises #UD.
        let Some(need) = isa_need(ins) else {
            return false;
        };
        let gpr_only =
            isa::POPCNT | isa::BMI1 | isa::BMI2 | isa::ADX | isa::MOVBE | isa::SSE42 | isa::LZCNT;
        return need != 0 && need & !(model & gpr_only) == 0;
    }
    is_cmov_or_setcc(m)
        || matches!(
            m,
            M::Add
                | M::Or
                | M::Adc
                | M::Sbb
                | M::And
                | M::Sub
                | M::Xor
                | M::Cmp
                | M::Test
                | M::Inc
                | M::Dec
                | M::Neg
                | M::Not
                | M::Mov
                | M::Movzx
                | M::Movsx
                | M::Movsxd
                | M::Imul
                | M::Mul
                | M::Shl
                | M::Sal
                | M::Shr
                | M::Sar
                | M::Rol
                | M::Ror
                | M::Rcl
                | M::Rcr
                | M::Shld
                | M::Shrd
                | M::Xchg
                | M::Bswap
                | M::Cbw
                | M::Cwde
                | M::Cdqe
                | M::Cwd
                | M::Cdq
                | M::Cqo
                | M::Bt
                | M::Bts
                | M::Btr
                | M::Btc
                | M::Bsf
                | M::Bsr
                | M::Cmpxchg
                | M::Cmpxchg16b
                | M::Xadd
                // CF lives in the host's RFLAGS like the other status flags.
                | M::Stc
                | M::Clc
                | M::Cmc
                // The host's fences order the host's accesses, which are the guest's.
                | M::Lfence
                | M::Mfence
                | M::Sfence
        )
}

fn guest_gpr(r: Register) -> bool {
    r.is_gpr64() || r.is_gpr32() || r.is_gpr16() || r.is_gpr8()
}

/// AH, CH, DH or BH: encodable only without a REX prefix.
pub(super) fn high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// Registers an instruction without a REX prefix can name.
fn legacy(r: Register) -> bool {
    matches!(
        r,
        Register::RAX
            | Register::RCX
            | Register::RDX
            | Register::RBX
            | Register::RSI
            | Register::RDI
            | Register::RBP
    )
}

/// What compiled code does with `ins`; `model` is the CPU model's ISA (see
/// `hostexec::isa`). None: not covered.
pub(super) fn kind(ins: &Instruction, last: bool, model: u64) -> Option<Kind> {
    match ins.code_size() {
        CodeSize::Code64 => kind64(ins, last, model),
        CodeSize::Code32 => kind32(ins, last, model),
        _ => None,
    }
}

/// 32-bit protected-mode (or compatibility-mode) code, which runs only with flat CS, DS,
/// ES and SS (base 0, 4 GiB limit), a 32-bit stack and RSP's upper half clear (checked
/// where compiled code is entered), so that an offset is its linear address and ESP
/// moves as RSP's low half. The instructions that run as themselves in 64-bit mode do the
/// same there with 32-bit addresses; PUSH/POP of registers and immediates, LEAVE, and a
/// final CALL rel32/RET move ESP one 4-byte slot at a time. Not (yet) covered: other
/// stack instructions, REP strings, FS/GS and CS-relative operands, and encodings 64-bit
/// mode lacks, except INC/DEC r16/r32, which the host runs in their ModRM form.
fn kind32(ins: &Instruction, last: bool, model: u64) -> Option<Kind> {
    match ins.code() {
        Code::Push_r32 | Code::Pushd_imm32 | Code::Pushd_imm8 => return Some(Kind::Push),
        Code::Pop_r32 => return Some(Kind::Pop),
        Code::Leaved => return Some(Kind::Leave),
        Code::Call_rel32_32 if last => return Some(Kind::Call),
        Code::Retnd | Code::Retnd_imm16 if last => return Some(Kind::Ret),
        _ => {}
    }
    // Near branches are compiled from their target, not re-encoded. (With an operand-size
    // prefix the target wraps at 64 KiB: the interpreter's.)
    if last
        && (ins.is_jcc_short_or_near() || ins.is_jmp_short_or_near())
        && ins.op0_kind() == OpKind::NearBranch32
    {
        return Some(Kind::Branch);
    }
    let short_inc_dec = short_inc_dec(ins.code()).is_some();
    if !short_inc_dec && !ins.code().op_code().mode64() {
        return None;
    }
    // (REP strings come back as RepStos/RepMovs, which are not on the list.)
    let k = kind64(ins, last, model)?;
    matches!(
        k,
        Kind::Native
            | Kind::Lea
            | Kind::Nop
            | Kind::Branch
            | Kind::Div
            | Kind::Vector(_)
            | Kind::Vzeroupper
            | Kind::Cli
            | Kind::Sti
            | Kind::Cld
            | Kind::Std
            | Kind::Rdtsc
            | Kind::Rdtscp
            | Kind::Pause
            | Kind::Movs
            | Kind::Stos
    )
    .then_some(k)
}

/// The ModRM form of a one-byte INC/DEC (0x40-0x4f outside 64-bit mode, REX prefixes in
/// it): the same operation, encodable in 64-bit mode.
pub(super) fn short_inc_dec(code: Code) -> Option<Code> {
    Some(match code {
        Code::Inc_r16 => Code::Inc_rm16,
        Code::Inc_r32 => Code::Inc_rm32,
        Code::Dec_r16 => Code::Dec_rm16,
        Code::Dec_r32 => Code::Dec_rm32,
        _ => return None,
    })
}

fn kind64(ins: &Instruction, last: bool, model: u64) -> Option<Kind> {
    if last && (ins.is_jcc_short_or_near() || ins.is_jmp_short_or_near()) {
        return Some(Kind::Branch);
    }
    if ins.mnemonic() == M::Vzeroupper {
        let ok = model & isa::AVX != 0 && host_avx();
        return ok.then_some(Kind::Vzeroupper);
    }
    if let Some(v) = jit_vector(ins, model) {
        let plain =
            (0..ins.op_count()).all(|k| ins.op_kind(k) != OpKind::Memory) || plain_address(ins);
        // LOCK on a vector instruction is #UD (the interpreter's).
        return (plain && !ins.has_lock_prefix()).then_some(Kind::Vector(v));
    }
    if ins.has_rep_prefix()
        && matches!(ins.code(), Code::Stosb_m8_AL | Code::Stosq_m64_RAX)
        && ins.op0_kind() == OpKind::MemoryESRDI
        && !ins.has_lock_prefix()
    {
        return Some(Kind::RepStos);
    }
    if ins.has_rep_prefix()
        && matches!(ins.code(), Code::Movsb_m8_m8 | Code::Movsq_m64_m64)
        && ins.op0_kind() == OpKind::MemoryESRDI
        && ins.op1_kind() == OpKind::MemorySegRSI
        && ins.segment_prefix() == Register::None
        && !ins.has_lock_prefix()
    {
        return Some(Kind::RepMovs);
    }
    if !(ins.has_rep_prefix() || ins.has_repne_prefix() || ins.has_lock_prefix())
        && plain_string(ins)
    {
        match ins.code() {
            Code::Movsb_m8_m8 | Code::Movsw_m16_m16 | Code::Movsd_m32_m32 | Code::Movsq_m64_m64 => {
                return Some(Kind::Movs)
            }
            Code::Stosb_m8_AL | Code::Stosw_m16_AX | Code::Stosd_m32_EAX | Code::Stosq_m64_RAX => {
                return Some(Kind::Stos)
            }
            _ => {}
        }
    }
    if ins.has_rep_prefix() || ins.has_repne_prefix() {
        return None;
    }
    // LOCK runs as LOCK on the host, on the same guest RAM: as atomic as the guest asked
    // for, towards the other vCPU threads too. Only where the SDM allows it: elsewhere it
    // is #UD, which the interpreter raises (on the host it would be SIGILL).
    if ins.has_lock_prefix()
        && !(ins.op0_kind() == OpKind::Memory
            && matches!(
                ins.mnemonic(),
                M::Add
                    | M::Adc
                    | M::And
                    | M::Btc
                    | M::Btr
                    | M::Bts
                    | M::Cmpxchg
                    | M::Cmpxchg16b
                    | M::Dec
                    | M::Inc
                    | M::Neg
                    | M::Not
                    | M::Or
                    | M::Sbb
                    | M::Sub
                    | M::Xor
                    | M::Xadd
                    | M::Xchg
            ))
    {
        return None;
    }
    match ins.code() {
        Code::Push_r64 | Code::Pushq_imm32 | Code::Pushq_imm8 => return Some(Kind::Push),
        Code::Push_rm64 if ins.op0_kind() == OpKind::Memory && plain_address(ins) => {
            return Some(Kind::PushMem)
        }
        Code::Pop_r64 => return Some(Kind::Pop),
        Code::Leaveq => return Some(Kind::Leave),
        Code::Pushfq => return Some(Kind::PushFlags),
        Code::Cli => return Some(Kind::Cli),
        Code::Sti if !last => return Some(Kind::Sti),
        Code::Swapgs => return Some(Kind::Swapgs),
        Code::Cld => return Some(Kind::Cld),
        Code::Std => return Some(Kind::Std),
        Code::Rdtsc => return Some(Kind::Rdtsc),
        Code::Rdtscp => return Some(Kind::Rdtscp),
        Code::Pause => return Some(Kind::Pause),
        Code::Call_rel32_64 if last => return Some(Kind::Call),
        Code::Retnq | Code::Retnq_imm16 if last => return Some(Kind::Ret),
        Code::Jmp_rm64 | Code::Call_rm64 if last => {
            let ok = match ins.op0_kind() {
                OpKind::Register => ins.op0_register().is_gpr64(),
                OpKind::Memory => plain_address(ins) && ins.memory_size().size() == 8,
                _ => false,
            };
            let k = if ins.code() == Code::Jmp_rm64 {
                Kind::IndJmp
            } else {
                Kind::IndCall
            };
            return ok.then_some(k);
        }
        _ => {}
    }
    let m = ins.mnemonic();
    // Prefetches are hints: no access, no fault; ENDBR is a NOP here too.
    if matches!(
        m,
        M::Nop
            | M::Endbr64
            | M::Endbr32
            | M::Prefetch
            | M::Prefetchw
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
    ) {
        return Some(Kind::Nop);
    }
    if matches!(
        ins.code(),
        Code::Bt_rm64_r64
            | Code::Bts_rm64_r64
            | Code::Btr_rm64_r64
            | Code::Btc_rm64_r64
            | Code::Bt_rm32_r32
            | Code::Bts_rm32_r32
            | Code::Btr_rm32_r32
            | Code::Btc_rm32_r32
    ) && ins.op0_kind() == OpKind::Memory
        && plain_address(ins)
        && guest_gpr(ins.op1_register())
    {
        return Some(Kind::BitMem);
    }
    if !runs_natively(ins, model) && m != M::Lea && m != M::Div && m != M::Idiv {
        return None;
    }
    if matches!(
        ins.code(),
        Code::Mov_AL_moffs8
            | Code::Mov_AX_moffs16
            | Code::Mov_EAX_moffs32
            | Code::Mov_RAX_moffs64
            | Code::Mov_moffs8_AL
            | Code::Mov_moffs16_AX
            | Code::Mov_moffs32_EAX
            | Code::Mov_moffs64_RAX
    ) {
        return None;
    }
    for k in 0..ins.op_count() {
        match ins.op_kind(k) {
            OpKind::Register => {
                if !guest_gpr(ins.op_register(k)) {
                    return None;
                }
            }
            OpKind::Memory => {
                // CMPXCHG16B's m128 (its alignment is checked in compiled code).
                let size_ok = m == M::Lea
                    || (1..=8).contains(&ins.memory_size().size())
                    || ins.code() == Code::Cmpxchg16b_m128;
                if !(plain_address(ins) && size_ok) {
                    return None;
                }
                // BT* with a register offset address a bit string beyond the operand.
                if matches!(m, M::Bt | M::Bts | M::Btr | M::Btc)
                    && ins.op1_kind() == OpKind::Register
                {
                    return None;
                }
            }
            k if is_imm(k) => {}
            _ => return None,
        }
    }
    if m == M::Lea {
        let d = ins.op0_register();
        return (d.is_gpr64() || d.is_gpr32()).then_some(Kind::Lea);
    }
    if m == M::Div || m == M::Idiv {
        return matches!(
            ins.code(),
            Code::Div_rm64 | Code::Div_rm32 | Code::Idiv_rm64 | Code::Idiv_rm32
        )
        .then_some(Kind::Div);
    }
    Some(Kind::Native)
}

/// A memory operand compiled code can address: in 64-bit code, 64-bit base (or RIP) and
/// index registers; in 32-bit code, 32-bit ones in a flat segment (DS, ES or SS).
pub(super) fn plain_address(ins: &Instruction) -> bool {
    let base = ins.memory_base();
    let index = ins.memory_index();
    if ins.code_size() == CodeSize::Code32 {
        return (base == Register::None || base.is_gpr32())
            && (index == Register::None || index.is_gpr32())
            && matches!(
                ins.memory_segment(),
                Register::DS | Register::ES | Register::SS
            );
    }
    (base == Register::None || base == Register::RIP || base.is_gpr64())
        && (index == Register::None || index.is_gpr64())
}

/// A string instruction's operands are RSI/RDI (ESI/EDI in 32-bit code, where a source
/// override may name another flat segment); no FS/GS source, no 16-bit addresses.
fn plain_string(ins: &Instruction) -> bool {
    let seg_ok = match ins.segment_prefix() {
        Register::None => true,
        Register::DS | Register::ES | Register::SS => ins.code_size() == CodeSize::Code32,
        _ => false,
    };
    let (dst, src) = match ins.code_size() {
        CodeSize::Code64 => (OpKind::MemoryESRDI, OpKind::MemorySegRSI),
        CodeSize::Code32 => (OpKind::MemoryESEDI, OpKind::MemorySegESI),
        _ => return false,
    };
    // MOVS reads the source; STOS stores a register.
    seg_ok
        && ins.op0_kind() == dst
        && matches!(ins.op1_kind(), k if k == src || k == OpKind::Register)
}

/// A memory operand's displacement, as `Emitter::address` adds it: in 32-bit code
/// sign-extended (the sum wraps to 32 bits anyway, see `Mem::wrap32`).
pub(super) fn displacement(ins: &Instruction) -> u64 {
    let d = ins.memory_displacement64();
    if ins.code_size() == CodeSize::Code32 {
        d as u32 as i32 as i64 as u64
    } else {
        d
    }
}

/// How one memory operand is reached.
pub(super) struct Mem {
    pub(super) base: Option<usize>,
    pub(super) index: Option<usize>,
    pub(super) scale: u32,
    pub(super) disp: u64,
    /// The context field holding a non-zero segment base (FS, GS).
    pub(super) seg_base: Option<usize>,
    pub(super) size: u32,
    pub(super) write: bool,
    /// The effective address wraps at 4 GiB (32-bit code).
    pub(super) wrap32: bool,
}

/// Registers of one instruction: guest index → host register, and what to load and store.
pub(super) struct Regs {
    pub(super) map: [Register; 16],
    pub(super) load: [bool; 16],
    pub(super) store: [bool; 16],
    /// Holds the host address of the memory operand, or with `lin` its page's addend.
    pub(super) host_ptr: Register,
    /// Holds the memory operand's linear address, which the instruction then takes as
    /// its index (`host_ptr + lin`); None when no register is left for it.
    pub(super) lin: Register,
}

/// Plans the registers of a native instruction; None if it needs more than the pool has.
/// With `vectors`, XMM/YMM registers are left to the caller.
pub(super) fn plan_regs(
    ins: &Instruction,
    info: &mut InstructionInfoFactory,
    vectors: bool,
) -> Option<Regs> {
    let mut regs = Regs {
        map: [Register::None; 16],
        load: [false; 16],
        store: [false; 16],
        host_ptr: Register::None,
        lin: Register::None,
    };
    let explicit = |g: usize| {
        (0..ins.op_count())
            .any(|k| ins.op_kind(k) == OpKind::Register && gpr_index(ins.op_register(k)) == Some(g))
    };
    let addr_regs = [gpr_index(ins.memory_base()), gpr_index(ins.memory_index())];
    let mut used = [false; 16];
    for u in info.info(ins).used_registers() {
        let r = u.register();
        if r.is_segment_register() || (vectors && (r.is_xmm() || r.is_ymm() || r.is_zmm())) {
            continue;
        }
        if !guest_gpr(r) {
            return None;
        }
        let g = gpr_index(r)?;
        let acc = u.access();
        // Address registers are read in the address step: RSP and R15 (which need a host
        // register of their own) are skipped here unless they are operands too.
        if (g == RSP || g == R15)
            && acc == OpAccess::Read
            && addr_regs.contains(&Some(g))
            && !explicit(g)
        {
            continue;
        }
        used[g] = true;
        let full_write = acc == OpAccess::Write && r.size() >= 4;
        if !full_write {
            regs.load[g] = true;
        }
        if matches!(
            acc,
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        ) {
            regs.store[g] = true;
        }
    }
    let mut taken = [false; 16];
    for g in 0..16 {
        if used[g] && g != RSP && g != R15 {
            regs.map[g] = *POOL.iter().find(|p| gpr_index(**p) == Some(g))?;
            taken[g] = true;
        }
    }
    let mut free = POOL.iter().copied().filter(|p| {
        let i = gpr_index(*p).unwrap_or(RSP);
        !taken[i] && !matches!(*p, Register::RCX | Register::RBP | Register::R13)
    });
    for g in [RSP, R15] {
        if used[g] {
            regs.map[g] = free.next()?;
        }
    }
    regs.host_ptr = free.next()?;
    regs.lin = free.next().unwrap_or(Register::None);
    // AH..BH stay themselves (their full registers are their own), but then nothing the
    // instruction is rewritten with may need a REX prefix: neither a stand-in for RSP or
    // R15 nor the memory operand's host pointer.
    let high = (0..ins.op_count())
        .any(|k| ins.op_kind(k) == OpKind::Register && high_byte(ins.op_register(k)));
    if high {
        let memory = (0..ins.op_count()).any(|k| ins.op_kind(k) == OpKind::Memory);
        if used[RSP] || used[R15] || (memory && !legacy(regs.host_ptr)) {
            return None;
        }
        if !legacy(regs.lin) {
            regs.lin = Register::None;
        }
    }
    Some(regs)
}

pub(super) fn plan_mem(ins: &Instruction, info: &mut InstructionInfoFactory) -> Option<Mem> {
    if !(0..ins.op_count()).any(|k| ins.op_kind(k) == OpKind::Memory) {
        return None;
    }
    let write = info.info(ins).used_memory().iter().any(|m| {
        matches!(
            m.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        )
    });
    let seg_base = match ins.memory_segment() {
        Register::FS => Some(offset_of!(Ctx, fs_base)),
        Register::GS => Some(offset_of!(Ctx, gs_base)),
        _ => None,
    };
    Some(Mem {
        base: gpr_index(ins.memory_base()),
        index: gpr_index(ins.memory_index()),
        scale: ins.memory_index_scale(),
        disp: displacement(ins),
        seg_base,
        size: ins.memory_size().size() as u32,
        write,
        wrap32: ins.code_size() == CodeSize::Code32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Decoder;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, 0).decode()
    }

    const ALL: u64 = u64::MAX;

    #[test]
    fn covers_vector_and_bit_manipulation_forms() {
        // movdqu xmm1, [rax]; vpcmpeqb ymm1, ymm0, [rdi]; pmovmskb ecx, xmm1;
        // tzcnt eax, ecx; sha256rnds2 xmm1, xmm2 (XMM0 implicit)
        for bytes in [
            &[0xf3, 0x0f, 0x6f, 0x08][..],
            &[0xc5, 0xfd, 0x74, 0x0f],
            &[0x66, 0x0f, 0xd7, 0xc9],
            &[0xf3, 0x0f, 0xbc, 0xc1],
            &[0x0f, 0x38, 0xcb, 0xca],
        ] {
            let ins = decode(bytes);
            let k = kind(&ins, false, ALL);
            assert!(k.is_some(), "{ins} not covered");
        }
        let sha = decode(&[0x0f, 0x38, 0xcb, 0xca]);
        match kind(&sha, false, ALL) {
            Some(Kind::Vector(v)) => {
                assert_eq!(v.read[0], 1, "XMM0 is an implicit source");
                assert_eq!(v.write, 1 << 1);
            }
            _ => panic!("sha256rnds2"),
        }
    }

    #[test]
    fn leaves_out_floating_point_and_what_the_model_lacks() {
        // addps xmm0, xmm1 reads MXCSR; tzcnt without BMI1 in the model; repne scasb;
        // rep movsb with a segment override (rep movsb itself is covered).
        assert!(kind(&decode(&[0x0f, 0x58, 0xc1]), false, ALL).is_none());
        assert!(kind(&decode(&[0xf3, 0x0f, 0xbc, 0xc1]), false, 0).is_none());
        assert!(kind(&decode(&[0xf2, 0xae]), false, ALL).is_none());
        assert!(kind(&decode(&[0x64, 0xf3, 0xa4]), false, ALL).is_none());
        assert!(kind(&decode(&[0xf3, 0xa4]), false, ALL).is_some());
        // vpxor without AVX2 in the model
        assert!(kind(&decode(&[0xc5, 0xfd, 0xef, 0xc1]), false, ALL & !isa::AVX2).is_none());
    }
}
