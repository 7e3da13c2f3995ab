//! Specialised handlers for the most frequent instruction forms (register and simple
//! memory operands of MOV/ALU/LEA/PUSH/POP/Jcc/CALL/RET...). They skip the generic
//! operand-kind matching; the generic family handlers still cover every other form.
//! The differential tests exercise these through the same dispatch as everything else.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::flags::{add_flags, logic_flags, sub_flags};
use super::muldiv::{imul_truncated, mul_flags};
use super::operand::{immediate, mask, mem_seg, reg_size, sext};
use super::Handler;
use crate::cpu::Core;
use crate::decode::Insn;
use crate::exceptions::Result;
use crate::mmu::Access;
use crate::platform::Platform;
use crate::state::flags::{CF, STATUS};
use crate::state::Seg;

const ADD: u8 = 0;
const OR: u8 = 1;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;
const ADC: u8 = 9;
const SBB: u8 = 10;

/// Applies an ALU operation, sets the flags (unless `flags` is false: they are dead), and
/// returns the value to write back (None for CMP/TEST).
#[inline(always)]
fn alu<const OP: u8>(cpu: &mut Core, a: u64, b: u64, size: u32, flags: bool) -> Option<u64> {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    match OP {
        ADD => {
            let r = a.wrapping_add(b) & m;
            if flags {
                cpu.set_status(add_flags(a, b, 0, r, size));
            }
            Some(r)
        }
        SUB | CMP => {
            let r = a.wrapping_sub(b) & m;
            if flags {
                cpu.set_status(sub_flags(a, b, 0, r, size));
            }
            (OP == SUB).then_some(r)
        }
        ADC => {
            let c = u64::from(cpu.s.rflags & CF != 0);
            let r = a.wrapping_add(b).wrapping_add(c) & m;
            if flags {
                cpu.set_status(add_flags(a, b, c, r, size));
            }
            Some(r)
        }
        SBB => {
            let c = u64::from(cpu.s.rflags & CF != 0);
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            if flags {
                cpu.set_status(sub_flags(a, b, c, r, size));
            }
            Some(r)
        }
        AND | TEST => {
            let r = a & b;
            if flags {
                cpu.set_status(logic_flags(r, size));
            }
            (OP == AND).then_some(r)
        }
        OR => {
            let r = a | b;
            if flags {
                cpu.set_status(logic_flags(r, size));
            }
            Some(r)
        }
        _ => {
            let r = a ^ b;
            if flags {
                cpu.set_status(logic_flags(r, size));
            }
            Some(r)
        }
    }
}

/// Operands of the fast forms, resolved once at decode time so the handlers index the
/// register file directly instead of matching iced-x86 register and operand kinds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Uop {
    /// Register-file indices of a register operand 0 and 1 (`NO_REG` otherwise).
    d: u8,
    s: u8,
    /// Size in bytes of operand 0 (and of the operation).
    size: u8,
    /// Size in bytes of operand 1 (MOVZX/MOVSX sources).
    ssize: u8,
    /// Memory operand: base and index registers (`NO_REG` for none), scale as a shift,
    /// displacement (iced folds RIP-relative targets into it), address-size mask.
    base: u8,
    index: u8,
    scale: u8,
    msize: u8,
    seg: Seg,
    /// 64-bit code with a segment whose base is 0: the effective address is linear.
    flat: bool,
    amask: u64,
    disp: u64,
    /// The immediate operand, extended as its operand kind says; or a branch target.
    imm: u64,
    /// The status flags this instruction writes are overwritten before anything can read
    /// them (set by the block decoder): the handler skips computing them.
    pub(crate) flags_dead: bool,
}

const NO_REG: u8 = 0xff;

impl Default for Uop {
    fn default() -> Self {
        Uop {
            d: NO_REG,
            s: NO_REG,
            size: 8,
            ssize: 8,
            base: NO_REG,
            index: NO_REG,
            scale: 0,
            msize: 8,
            seg: Seg::Ds,
            flat: false,
            amask: u64::MAX,
            disp: 0,
            imm: 0,
            flags_dead: false,
        }
    }
}

/// Register-file index and size of a GPR other than AH/CH/DH/BH (whose bits are not at
/// the bottom of their register).
fn gpr(r: Register) -> Option<(u8, u8)> {
    if !r.is_gpr() || matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        return None;
    }
    Some((r.full_register().number() as u8, reg_size(r) as u8))
}

/// Resolves the operands of `ins` for the fast handlers.
pub(crate) fn uop_for(ins: &Instruction) -> Uop {
    let mut u = Uop::default();
    let n = ins.op_count();
    for i in 0..n.min(3) {
        match ins.op_kind(i) {
            OpKind::Register => {
                if let Some((idx, size)) = gpr(ins.op_register(i)) {
                    match i {
                        0 => {
                            u.d = idx;
                            u.size = size;
                        }
                        1 => {
                            u.s = idx;
                            u.ssize = size;
                        }
                        _ => {}
                    }
                }
            }
            OpKind::Memory => {
                let size = ins.memory_size().size() as u8;
                u.msize = size;
                if i == 0 {
                    u.size = size;
                } else if i == 1 {
                    u.ssize = size;
                }
                u.seg = mem_seg(ins);
                u.flat = ins.code_size() == iced_x86::CodeSize::Code64
                    && !matches!(u.seg, Seg::Fs | Seg::Gs);
                u.disp = ins.memory_displacement64();
                let base = ins.memory_base();
                let index = ins.memory_index();
                let mut asize = 0;
                if base != Register::None && base != Register::RIP && base != Register::EIP {
                    u.base = gpr(base).map_or(NO_REG, |g| g.0);
                    asize = reg_size(base);
                }
                if base == Register::EIP {
                    asize = 4;
                }
                if index != Register::None {
                    u.index = gpr(index).map_or(NO_REG, |g| g.0);
                    u.scale = ins.memory_index_scale().trailing_zeros() as u8;
                    if asize == 0 {
                        asize = reg_size(index);
                    }
                }
                if asize == 0 {
                    asize = match ins.code_size() {
                        iced_x86::CodeSize::Code64 => 8,
                        _ if ins.memory_displ_size() == 2 => 2,
                        _ => 4,
                    };
                }
                u.amask = mask(asize);
            }
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                u.imm = ins.near_branch_target();
            }
            k => {
                if let Some(v) = immediate(ins, k) {
                    u.imm = v;
                }
            }
        }
    }
    u
}

impl Uop {
    #[inline(always)]
    fn ea(&self, cpu: &Core) -> u64 {
        let g = &cpu.s.gpr;
        let mut a = self.disp;
        if let Some(b) = g.get(usize::from(self.base)) {
            a = a.wrapping_add(*b);
        }
        if let Some(i) = g.get(usize::from(self.index)) {
            a = a.wrapping_add(*i << self.scale);
        }
        a & self.amask
    }

    #[inline(always)]
    fn read_mem(&self, cpu: &mut Core, p: &mut dyn Platform) -> Result<u64> {
        let a = self.ea(cpu);
        if self.flat {
            return flat_read(cpu, p, self.seg, a, self.msize);
        }
        cpu.read_mem(p, self.seg, a, u32::from(self.msize))
    }

    #[inline(always)]
    fn write_mem(&self, cpu: &mut Core, p: &mut dyn Platform, v: u64) -> Result<()> {
        let a = self.ea(cpu);
        if self.flat {
            return flat_write(cpu, p, self.seg, a, self.msize, v);
        }
        cpu.write_mem(p, self.seg, a, u32::from(self.msize), v)
    }
}

/// A read in 64-bit mode through a segment whose base is 0 (`a` is linear): straight
/// from the TLB when it maps the page, else the full path (canonical check, walk, MMIO).
#[inline(always)]
fn flat_read(cpu: &mut Core, p: &mut dyn Platform, seg: Seg, a: u64, size: u8) -> Result<u64> {
    let user = cpu.user();
    if let Some(ptr) = cpu.tlb_hit(a, usize::from(size), Access::Read, user) {
        // SAFETY: `ptr` has `size` readable bytes in a RAM page (tlb_hit).
        return Ok(unsafe { load(ptr, size) });
    }
    cpu.read_mem(p, seg, a, u32::from(size))
}

/// The write counterpart of [`flat_read`].
#[inline(always)]
fn flat_write(
    cpu: &mut Core,
    p: &mut dyn Platform,
    seg: Seg,
    a: u64,
    size: u8,
    v: u64,
) -> Result<()> {
    let user = cpu.user();
    if let Some(ptr) = cpu.tlb_hit(a, usize::from(size), Access::Write, user) {
        // SAFETY: `ptr` has `size` writable bytes in a RAM page (tlb_hit).
        unsafe { store(ptr, size, v) };
        return Ok(());
    }
    cpu.write_mem(p, seg, a, u32::from(size), v)
}

/// Reads a little-endian value of `size` bytes (1, 2, 4 or 8).
///
/// # Safety
/// `ptr` must have `size` readable bytes.
#[inline(always)]
unsafe fn load(ptr: *const u8, size: u8) -> u64 {
    // SAFETY: the caller's contract; unaligned reads are fine on x86 hosts and in Rust.
    unsafe {
        match size {
            1 => u64::from(*ptr),
            2 => u64::from(u16::from_le(std::ptr::read_unaligned(ptr.cast::<u16>()))),
            4 => u64::from(u32::from_le(std::ptr::read_unaligned(ptr.cast::<u32>()))),
            _ => u64::from_le(std::ptr::read_unaligned(ptr.cast::<u64>())),
        }
    }
}

/// Writes the low `size` bytes (1, 2, 4 or 8) of `v`, little-endian.
///
/// # Safety
/// `ptr` must have `size` writable bytes.
#[inline(always)]
unsafe fn store(ptr: *mut u8, size: u8, v: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        match size {
            1 => *ptr = v as u8,
            2 => std::ptr::write_unaligned(ptr.cast::<u16>(), (v as u16).to_le()),
            4 => std::ptr::write_unaligned(ptr.cast::<u32>(), (v as u32).to_le()),
            _ => std::ptr::write_unaligned(ptr.cast::<u64>(), v.to_le()),
        }
    }
}

/// The operation size: `S` when the handler was instantiated for one (4 or 8 bytes, so
/// masks and sign bits fold to constants), else the decoded one.
#[inline(always)]
fn sized<const S: u8>(u: &Uop) -> u8 {
    if S == 0 {
        u.size
    } else {
        S
    }
}

/// Reads register `i` at `size` bytes (zero-extended).
#[inline(always)]
fn rd(cpu: &Core, i: u8, size: u8) -> u64 {
    cpu.s.gpr[usize::from(i) & 15] & mask(u32::from(size))
}

/// Writes register `i` at `size` bytes with x86 width rules (32-bit writes zero-extend,
/// 8/16-bit writes merge).
#[inline(always)]
fn wr(cpu: &mut Core, i: u8, size: u8, v: u64) {
    let r = &mut cpu.s.gpr[usize::from(i) & 15];
    *r = match size {
        8 => v,
        4 => v & 0xffff_ffff,
        _ => {
            let m = mask(u32::from(size));
            (*r & !m) | (v & m)
        }
    };
}

fn alu_rr<const OP: u8, const S: u8>(
    cpu: &mut Core,
    _p: &mut dyn Platform,
    i: &Insn,
) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let a = rd(cpu, u.d, size);
    let b = rd(cpu, u.s, size);
    if let Some(r) = alu::<OP>(cpu, a, b, u32::from(size), !u.flags_dead) {
        wr(cpu, u.d, size, r);
    }
    Ok(())
}

fn alu_ri<const OP: u8, const S: u8>(
    cpu: &mut Core,
    _p: &mut dyn Platform,
    i: &Insn,
) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let a = rd(cpu, u.d, size);
    if let Some(r) = alu::<OP>(cpu, a, u.imm, u32::from(size), !u.flags_dead) {
        wr(cpu, u.d, size, r);
    }
    Ok(())
}

fn alu_rm<const OP: u8, const S: u8>(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let b = u.read_mem(cpu, p)?;
    let a = rd(cpu, u.d, size);
    if let Some(r) = alu::<OP>(cpu, a, b, u32::from(size), !u.flags_dead) {
        wr(cpu, u.d, size, r);
    }
    Ok(())
}

/// CMP/TEST with a memory first operand (no write-back, so no locking concerns).
fn alu_mr<const OP: u8>(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let a = u.read_mem(cpu, p)?;
    let b = rd(cpu, u.s, u.size);
    alu::<OP>(cpu, a, b, u32::from(u.size), true);
    Ok(())
}

fn alu_mi<const OP: u8>(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let a = u.read_mem(cpu, p)?;
    alu::<OP>(cpu, a, u.imm, u32::from(u.size), true);
    Ok(())
}

/// IMUL with a register destination: `d = d * src` or `d = src * imm`.
fn imul_r<const THREE: bool, const S: u8>(
    cpu: &mut Core,
    p: &mut dyn Platform,
    i: &Insn,
) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let src = if u.s != NO_REG {
        rd(cpu, u.s, size)
    } else {
        u.read_mem(cpu, p)?
    };
    let (a, b) = if THREE {
        (src, u.imm)
    } else {
        (rd(cpu, u.d, size), src)
    };
    let (lo, of) = imul_truncated(a, b, u32::from(size));
    wr(cpu, u.d, size, lo);
    if !u.flags_dead {
        cpu.set_status(mul_flags(lo, u32::from(size), of));
    }
    Ok(())
}

/// CMOVcc with a register destination.
fn cmov_r(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    // The source is read (and may fault) whether or not the move happens.
    let v = if u.s != NO_REG {
        rd(cpu, u.s, u.size)
    } else {
        u.read_mem(cpu, p)?
    };
    // A 32-bit destination is zero-extended even when the condition is false.
    let out = if cpu.cond(i.instr.condition_code()) {
        v
    } else {
        rd(cpu, u.d, u.size)
    };
    wr(cpu, u.d, u.size, out);
    Ok(())
}

/// SETcc with a register destination.
fn setcc_r(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let v = u64::from(cpu.cond(i.instr.condition_code()));
    wr(cpu, i.uop.d, 1, v);
    Ok(())
}

fn mov_rr<const S: u8>(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let v = rd(cpu, u.s, size);
    wr(cpu, u.d, size, v);
    Ok(())
}

fn mov_ri(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    wr(cpu, u.d, u.size, u.imm);
    Ok(())
}

fn mov_rm<const S: u8>(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let size = sized::<S>(u);
    let v = u.read_mem(cpu, p)?;
    wr(cpu, u.d, size, v);
    Ok(())
}

fn mov_mr(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let v = rd(cpu, u.s, u.msize);
    u.write_mem(cpu, p, v)
}

fn mov_mi(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    u.write_mem(cpu, p, u.imm)
}

/// MOVZX/MOVSX (and MOVSXD) from a register or memory.
fn movx<const SIGNED: bool>(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let v = if u.s != NO_REG {
        rd(cpu, u.s, u.ssize)
    } else {
        u.read_mem(cpu, p)?
    };
    let v = if SIGNED {
        sext(v, u32::from(u.ssize)) & mask(u32::from(u.size))
    } else {
        v
    };
    wr(cpu, u.d, u.size, v);
    Ok(())
}

fn lea(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let v = u.ea(cpu);
    wr(cpu, u.d, u.size, v);
    Ok(())
}

fn inc_dec_r<const INC: bool>(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let u = &i.uop;
    let size = u32::from(u.size);
    let a = rd(cpu, u.d, u.size);
    let (r, f) = if INC {
        let r = a.wrapping_add(1) & mask(size);
        (r, add_flags(a, 1, 0, r, size))
    } else {
        let r = a.wrapping_sub(1) & mask(size);
        (r, sub_flags(a, 1, 0, r, size))
    };
    if !u.flags_dead {
        cpu.set_flags_masked(f, STATUS & !CF);
    }
    wr(cpu, u.d, u.size, r);
    Ok(())
}

fn jcc(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    if cpu.cond(i.instr.condition_code()) {
        cpu.jump(i.uop.imm)?;
    }
    Ok(())
}

fn jmp_rel(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    cpu.jump(i.uop.imm)
}

/// 64-bit mode CALL rel32.
fn call_rel64(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let ret = cpu.next_rip;
    let sp = cpu.s.gpr[4].wrapping_sub(8);
    flat_write(cpu, p, Seg::Ss, sp, 8, ret)?;
    cpu.jump(i.uop.imm)?;
    cpu.s.gpr[4] = sp;
    Ok(())
}

/// 64-bit mode RET.
fn ret64(cpu: &mut Core, p: &mut dyn Platform, _i: &Insn) -> Result<()> {
    let sp = cpu.s.gpr[4];
    let target = flat_read(cpu, p, Seg::Ss, sp, 8)?;
    cpu.jump(target)?;
    cpu.s.gpr[4] = sp.wrapping_add(8);
    Ok(())
}

/// 64-bit mode PUSH r64.
fn push_r64(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let v = rd(cpu, i.uop.d, 8);
    let sp = cpu.s.gpr[4].wrapping_sub(8);
    flat_write(cpu, p, Seg::Ss, sp, 8, v)?;
    cpu.s.gpr[4] = sp;
    Ok(())
}

/// 64-bit mode POP r64.
fn pop_r64(cpu: &mut Core, p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let sp = cpu.s.gpr[4];
    let v = flat_read(cpu, p, Seg::Ss, sp, 8)?;
    cpu.s.gpr[4] = sp.wrapping_add(8);
    wr(cpu, i.uop.d, 8, v);
    Ok(())
}

/// SHL/SAL (K=0), SHR (1), SAR (2), ROL (3) or ROR (4) of a register by an immediate
/// (the `, 1` forms included); one instance per operation so the flag logic is inlined.
fn shift_ri<const K: u8>(cpu: &mut Core, _p: &mut dyn Platform, i: &Insn) -> Result<()> {
    let m = match K {
        0 => M::Shl,
        1 => M::Shr,
        2 => M::Sar,
        3 => M::Rol,
        _ => M::Ror,
    };
    let u = &i.uop;
    let size = u32::from(u.size);
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let c = (u.imm as u32) & cmask;
    let a = rd(cpu, u.d, u.size);
    if c == 0 {
        // No flags change; a 32-bit destination is still zero-extended.
        wr(cpu, u.d, u.size, a);
        return Ok(());
    }
    let (r, f, which) = super::shift::compute(m, a, c, size, u64::from(cpu.flag(CF)), 0);
    wr(cpu, u.d, u.size, r);
    if !u.flags_dead {
        cpu.set_flags_masked(f, which);
    }
    Ok(())
}

fn nop(_: &mut Core, _: &mut dyn Platform, _: &Insn) -> Result<()> {
    Ok(())
}

/// Whether `ins`, whose handler is a fast form if `fast`, skips its flags when they are
/// dead.
pub(crate) fn skips_dead_flags(ins: &Instruction, fast: bool) -> bool {
    matches!(
        ins.mnemonic(),
        M::Add
            | M::Sub
            | M::Adc
            | M::Sbb
            | M::And
            | M::Or
            | M::Xor
            | M::Inc
            | M::Dec
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Imul
    ) && ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && fast
}

/// Whether `ins`, whose handler is a fast form if `fast`, cannot raise an exception (no
/// memory access), so nothing can observe the flags while it runs.
pub(crate) fn cannot_fault(ins: &Instruction, fast: bool) -> bool {
    let touches_memory =
        (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory) && ins.mnemonic() != M::Lea;
    !touches_memory && !matches!(ins.mnemonic(), M::Push | M::Pop) && fast
}

/// Operand `i` is a GPR the fast handlers can index (not AH/CH/DH/BH).
fn is_gpr(ins: &Instruction, i: u32) -> bool {
    ins.op_kind(i) == OpKind::Register && gpr(ins.op_register(i)).is_some()
}

/// A specialised handler for `ins`, if it has one of the common simple forms.
pub(crate) fn select(ins: &Instruction) -> Option<Handler> {
    let m = ins.mnemonic();
    let n = ins.op_count();
    let bits64 = ins.code_size() == iced_x86::CodeSize::Code64;
    let k0 = if n > 0 {
        ins.op0_kind()
    } else {
        OpKind::Register
    };
    let k1 = if n > 1 {
        ins.op1_kind()
    } else {
        OpKind::Register
    };
    let r0 = n > 0 && is_gpr(ins, 0);
    let conditional = ins.condition_code() != iced_x86::ConditionCode::None
        && ins.flow_control() == iced_x86::FlowControl::Next;
    let r1 = n > 1 && is_gpr(ins, 1);
    let m1 = k1 == OpKind::Memory;
    let i1 = is_imm(k1);
    let size0 = if r0 { reg_size(ins.op0_register()) } else { 0 };
    // The 64-bit, 32-bit or size-generic instance of a handler, after its other const
    // arguments if it has some.
    macro_rules! by_size {
        ($h:ident $(, $arg:expr)?) => {
            match size0 {
                8 => $h::<$({ $arg },)? 8> as Handler,
                4 => $h::<$({ $arg },)? 4> as Handler,
                _ => $h::<$({ $arg },)? 0> as Handler,
            }
        };
    }
    macro_rules! alu_forms {
        ($op:expr) => {{
            if n != 2 {
                None
            } else if r0 && r1 {
                Some(by_size!(alu_rr, $op))
            } else if r0 && i1 {
                Some(by_size!(alu_ri, $op))
            } else if r0 && m1 {
                Some(by_size!(alu_rm, $op))
            } else if k0 == OpKind::Memory && r1 && ($op == CMP || $op == TEST) {
                Some(alu_mr::<{ $op }> as Handler)
            } else if k0 == OpKind::Memory && i1 && ($op == CMP || $op == TEST) {
                Some(alu_mi::<{ $op }> as Handler)
            } else {
                None
            }
        }};
    }
    match m {
        M::Add => alu_forms!(ADD),
        M::Or => alu_forms!(OR),
        M::And => alu_forms!(AND),
        M::Sub => alu_forms!(SUB),
        M::Xor => alu_forms!(XOR),
        M::Cmp => alu_forms!(CMP),
        M::Test => alu_forms!(TEST),
        M::Adc => alu_forms!(ADC),
        M::Sbb => alu_forms!(SBB),
        M::Imul if n == 2 && r0 && (r1 || m1) => Some(by_size!(imul_r, false)),
        M::Imul if n == 3 && r0 && (r1 || m1) && is_imm(ins.op2_kind()) => {
            Some(by_size!(imul_r, true))
        }
        // With a condition code, two GPR/memory operands make a CMOVcc and one GPR a
        // SETcc (Jcc has a branch operand; FCMOVcc, x87 registers).
        _ if conditional && n == 2 && r0 && (r1 || m1) => Some(cmov_r),
        _ if conditional && n == 1 && r0 => Some(setcc_r),
        M::Mov if n == 2 && r0 && r1 => Some(by_size!(mov_rr)),
        M::Mov if n == 2 && r0 && i1 => Some(mov_ri),
        M::Mov if n == 2 && r0 && m1 => Some(by_size!(mov_rm)),
        M::Mov if n == 2 && k0 == OpKind::Memory && r1 => Some(mov_mr),
        M::Mov if n == 2 && k0 == OpKind::Memory && i1 => Some(mov_mi),
        M::Movzx if r0 && (r1 || m1) => Some(movx::<false>),
        M::Movsx | M::Movsxd if r0 && (r1 || m1) => Some(movx::<true>),
        M::Lea if r0 => Some(lea),
        M::Inc if r0 => Some(inc_dec_r::<true>),
        M::Dec if r0 => Some(inc_dec_r::<false>),
        M::Nop => Some(nop),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror
            if n == 2 && r0 && ins.op1_kind() == OpKind::Immediate8 =>
        {
            Some(match m {
                M::Shl | M::Sal => shift_ri::<0> as Handler,
                M::Shr => shift_ri::<1>,
                M::Sar => shift_ri::<2>,
                M::Rol => shift_ri::<3>,
                _ => shift_ri::<4>,
            })
        }
        _ if ins.is_jcc_short_or_near() => Some(jcc),
        M::Jmp if ins.is_jmp_short_or_near() => Some(jmp_rel),
        M::Call if bits64 && ins.op0_kind() == OpKind::NearBranch64 => Some(call_rel64),
        M::Ret if bits64 && n == 0 && ins.code() == iced_x86::Code::Retnq => Some(ret64),
        M::Push if bits64 && r0 && ins.op0_register().is_gpr64() => Some(push_r64),
        M::Pop
            if bits64
                && r0
                && ins.op0_register().is_gpr64()
                && ins.op0_register() != Register::RSP =>
        {
            Some(pop_r64)
        }
        _ => None,
    }
}

pub(crate) fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}
