//! Specialised handlers for the most frequent instruction forms (register and simple
//! memory operands of MOV/ALU/LEA/PUSH/POP/Jcc/CALL/RET...). They skip the generic
//! operand-kind matching; the generic family handlers still cover every other form.
//! The differential tests exercise these through the same dispatch as everything else.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::flags::{add_flags, logic_flags, sub_flags};
use super::muldiv::{imul_truncated, mul_flags};
use super::operand::{ea, mask, mem_seg, reg_read, reg_size, reg_write, sext};
use super::Handler;
use crate::cpu::Core;
use crate::exceptions::Result;
use crate::platform::Platform;
use crate::state::flags::{CF, STATUS};

const ADD: u8 = 0;
const OR: u8 = 1;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;
const ADC: u8 = 9;
const SBB: u8 = 10;

/// Applies an ALU operation, sets the flags, and returns the value to write back (None for
/// CMP/TEST).
#[inline(always)]
fn alu<const OP: u8>(cpu: &mut Core, a: u64, b: u64, size: u32) -> Option<u64> {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    match OP {
        ADD => {
            let r = a.wrapping_add(b) & m;
            cpu.set_status(add_flags(a, b, 0, r, size));
            Some(r)
        }
        SUB | CMP => {
            let r = a.wrapping_sub(b) & m;
            cpu.set_status(sub_flags(a, b, 0, r, size));
            (OP == SUB).then_some(r)
        }
        ADC => {
            let c = u64::from(cpu.s.rflags & CF != 0);
            let r = a.wrapping_add(b).wrapping_add(c) & m;
            cpu.set_status(add_flags(a, b, c, r, size));
            Some(r)
        }
        SBB => {
            let c = u64::from(cpu.s.rflags & CF != 0);
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            cpu.set_status(sub_flags(a, b, c, r, size));
            Some(r)
        }
        AND | TEST => {
            let r = a & b;
            cpu.set_status(logic_flags(r, size));
            (OP == AND).then_some(r)
        }
        OR => {
            let r = a | b;
            cpu.set_status(logic_flags(r, size));
            Some(r)
        }
        _ => {
            let r = a ^ b;
            cpu.set_status(logic_flags(r, size));
            Some(r)
        }
    }
}

fn alu_rr<const OP: u8>(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let d = ins.op0_register();
    let size = reg_size(d);
    let a = reg_read(cpu, d);
    let b = reg_read(cpu, ins.op1_register());
    if let Some(r) = alu::<OP>(cpu, a, b, size) {
        reg_write(cpu, d, r);
    }
    Ok(())
}

/// Register destination, immediate or memory source.
fn alu_rx<const OP: u8>(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let d = ins.op0_register();
    let size = reg_size(d);
    let b = cpu.read_op(p, ins, 1)?;
    let a = reg_read(cpu, d);
    if let Some(r) = alu::<OP>(cpu, a, b, size) {
        reg_write(cpu, d, r);
    }
    Ok(())
}

/// CMP/TEST with a memory first operand (no write-back, so no locking concerns).
fn alu_mx<const OP: u8>(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let size = ins.memory_size().size() as u32;
    let a = cpu.read_mem(p, mem_seg(ins), ea(cpu, ins), size)?;
    let b = cpu.read_op(p, ins, 1)?;
    alu::<OP>(cpu, a, b, size);
    Ok(())
}

/// IMUL with a register destination (two- and three-operand forms).
fn imul_r<const SRC: u32>(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let d = ins.op0_register();
    let size = reg_size(d);
    let (a, b) = if SRC == 1 {
        (reg_read(cpu, d), cpu.read_op(p, ins, 1)?)
    } else {
        (cpu.read_op(p, ins, 1)?, cpu.read_op(p, ins, 2)?)
    };
    let (lo, of) = imul_truncated(a, b, size);
    reg_write(cpu, d, lo);
    cpu.set_status(mul_flags(lo, size, of));
    Ok(())
}

/// CMOVcc with a register destination.
fn cmov_r(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    // The source is read (and may fault) whether or not the move happens.
    let v = cpu.read_op(p, ins, 1)?;
    let d = ins.op0_register();
    // A 32-bit destination is zero-extended even when the condition is false.
    let out = if cpu.cond(ins.condition_code()) {
        v
    } else {
        reg_read(cpu, d)
    };
    reg_write(cpu, d, out);
    Ok(())
}

/// SETcc with a register destination.
fn setcc_r(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = u64::from(cpu.cond(ins.condition_code()));
    reg_write(cpu, ins.op0_register(), v);
    Ok(())
}

fn mov_rr(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = reg_read(cpu, ins.op1_register());
    reg_write(cpu, ins.op0_register(), v);
    Ok(())
}

fn mov_rx(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = cpu.read_op(p, ins, 1)?;
    reg_write(cpu, ins.op0_register(), v);
    Ok(())
}

fn mov_mx(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = cpu.read_op(p, ins, 1)?;
    let size = ins.memory_size().size() as u32;
    let a = ea(cpu, ins);
    cpu.write_mem(p, mem_seg(ins), a, size, v)
}

fn movzx(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = cpu.read_op(p, ins, 1)?;
    reg_write(cpu, ins.op0_register(), v);
    Ok(())
}

fn movsx(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let from = cpu.op_size(ins, 1);
    let d = ins.op0_register();
    let v = sext(cpu.read_op(p, ins, 1)?, from) & mask(reg_size(d));
    reg_write(cpu, d, v);
    Ok(())
}

fn lea(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let d = ins.op0_register();
    let v = ea(cpu, ins) & mask(reg_size(d));
    reg_write(cpu, d, v);
    Ok(())
}

fn inc_dec_r<const INC: bool>(
    cpu: &mut Core,
    _p: &mut dyn Platform,
    ins: &Instruction,
) -> Result<()> {
    let d = ins.op0_register();
    let size = reg_size(d);
    let a = reg_read(cpu, d);
    let (r, f) = if INC {
        let r = a.wrapping_add(1) & mask(size);
        (r, add_flags(a, 1, 0, r, size))
    } else {
        let r = a.wrapping_sub(1) & mask(size);
        (r, sub_flags(a, 1, 0, r, size))
    };
    cpu.set_flags_masked(f, STATUS & !CF);
    reg_write(cpu, d, r);
    Ok(())
}

fn jcc(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    if cpu.cond(ins.condition_code()) {
        cpu.jump(ins.near_branch_target())?;
    }
    Ok(())
}

fn jmp_rel(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    cpu.jump(ins.near_branch_target())
}

/// 64-bit mode CALL rel32.
fn call_rel64(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let target = ins.near_branch_target();
    let ret = cpu.next_rip;
    let sp = cpu.s.gpr[4].wrapping_sub(8);
    cpu.write_mem(p, crate::state::Seg::Ss, sp, 8, ret)?;
    cpu.jump(target)?;
    cpu.s.gpr[4] = sp;
    Ok(())
}

/// 64-bit mode RET.
fn ret64(cpu: &mut Core, p: &mut dyn Platform, _ins: &Instruction) -> Result<()> {
    let sp = cpu.s.gpr[4];
    let target = cpu.read_mem(p, crate::state::Seg::Ss, sp, 8)?;
    cpu.jump(target)?;
    cpu.s.gpr[4] = sp.wrapping_add(8);
    Ok(())
}

/// 64-bit mode PUSH r64.
fn push_r64(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let v = reg_read(cpu, ins.op0_register());
    let sp = cpu.s.gpr[4].wrapping_sub(8);
    cpu.write_mem(p, crate::state::Seg::Ss, sp, 8, v)?;
    cpu.s.gpr[4] = sp;
    Ok(())
}

/// 64-bit mode POP r64.
fn pop_r64(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let sp = cpu.s.gpr[4];
    let v = cpu.read_mem(p, crate::state::Seg::Ss, sp, 8)?;
    cpu.s.gpr[4] = sp.wrapping_add(8);
    reg_write(cpu, ins.op0_register(), v);
    Ok(())
}

/// SHL/SAL/SHR/SAR/ROL/ROR of a register by an immediate (the `, 1` forms included).
fn shift_ri(cpu: &mut Core, _p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let d = ins.op0_register();
    let size = reg_size(d);
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let c = u32::from(ins.immediate8()) & cmask;
    let a = reg_read(cpu, d);
    if c == 0 {
        // No flags change; a 32-bit destination is still zero-extended.
        reg_write(cpu, d, a);
        return Ok(());
    }
    let (r, f, which) =
        super::shift::compute(ins.mnemonic(), a, c, size, u64::from(cpu.flag(CF)), 0);
    reg_write(cpu, d, r);
    cpu.set_flags_masked(f, which);
    Ok(())
}

fn nop(_: &mut Core, _: &mut dyn Platform, _: &Instruction) -> Result<()> {
    Ok(())
}

fn is_gpr(ins: &Instruction, i: u32) -> bool {
    ins.op_kind(i) == OpKind::Register && ins.op_register(i).is_gpr()
}

/// A specialised handler for `ins`, if it has one of the common simple forms.
pub(crate) fn select(ins: &Instruction) -> Option<Handler> {
    let m = ins.mnemonic();
    let n = ins.op_count();
    let bits64 = ins.code_size() == iced_x86::CodeSize::Code64;
    let k1 = if n > 1 {
        ins.op1_kind()
    } else {
        OpKind::Register
    };
    let src_ok = n == 2 && (is_gpr(ins, 1) || k1 == OpKind::Memory || is_imm(k1));
    macro_rules! alu_forms {
        ($op:expr) => {{
            if n != 2 {
                return None;
            }
            if is_gpr(ins, 0) && is_gpr(ins, 1) {
                Some(alu_rr::<{ $op }> as Handler)
            } else if is_gpr(ins, 0) && src_ok {
                Some(alu_rx::<{ $op }> as Handler)
            } else if ins.op0_kind() == OpKind::Memory
                && (is_gpr(ins, 1) || is_imm(k1))
                && ($op == CMP || $op == TEST)
            {
                Some(alu_mx::<{ $op }> as Handler)
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
        M::Adc if n == 2 && is_gpr(ins, 0) && src_ok => {
            if is_gpr(ins, 1) {
                Some(alu_rr::<ADC> as Handler)
            } else {
                Some(alu_rx::<ADC> as Handler)
            }
        }
        M::Sbb if n == 2 && is_gpr(ins, 0) && src_ok => {
            if is_gpr(ins, 1) {
                Some(alu_rr::<SBB> as Handler)
            } else {
                Some(alu_rx::<SBB> as Handler)
            }
        }
        M::Imul if n == 2 && is_gpr(ins, 0) && src_ok => Some(imul_r::<1>),
        M::Imul
            if n == 3
                && is_gpr(ins, 0)
                && (is_gpr(ins, 1) || ins.op1_kind() == OpKind::Memory)
                && is_imm(ins.op2_kind()) =>
        {
            Some(imul_r::<2>)
        }
        _ if ins.condition_code() != iced_x86::ConditionCode::None
            && is_cmov(m)
            && n == 2
            && is_gpr(ins, 0)
            && (is_gpr(ins, 1) || k1 == OpKind::Memory) =>
        {
            Some(cmov_r)
        }
        _ if ins.condition_code() != iced_x86::ConditionCode::None
            && is_setcc(m)
            && is_gpr(ins, 0) =>
        {
            Some(setcc_r)
        }
        M::Mov if n == 2 && is_gpr(ins, 0) && is_gpr(ins, 1) => Some(mov_rr),
        M::Mov if n == 2 && is_gpr(ins, 0) && (k1 == OpKind::Memory || is_imm(k1)) => Some(mov_rx),
        M::Mov if n == 2 && ins.op0_kind() == OpKind::Memory && (is_gpr(ins, 1) || is_imm(k1)) => {
            Some(mov_mx)
        }
        M::Movzx if is_gpr(ins, 0) => Some(movzx),
        M::Movsx | M::Movsxd if is_gpr(ins, 0) => Some(movsx),
        M::Lea if is_gpr(ins, 0) => Some(lea),
        M::Inc if is_gpr(ins, 0) => Some(inc_dec_r::<true>),
        M::Dec if is_gpr(ins, 0) => Some(inc_dec_r::<false>),
        M::Nop => Some(nop),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror
            if n == 2 && is_gpr(ins, 0) && ins.op1_kind() == OpKind::Immediate8 =>
        {
            Some(shift_ri)
        }
        _ if ins.is_jcc_short_or_near() => Some(jcc),
        M::Jmp if ins.is_jmp_short_or_near() => Some(jmp_rel),
        M::Call if bits64 && ins.op0_kind() == OpKind::NearBranch64 => Some(call_rel64),
        M::Ret if bits64 && n == 0 && ins.code() == iced_x86::Code::Retnq => Some(ret64),
        M::Push if bits64 && is_gpr(ins, 0) && ins.op0_register().is_gpr64() => Some(push_r64),
        M::Pop
            if bits64
                && is_gpr(ins, 0)
                && ins.op0_register().is_gpr64()
                && ins.op0_register() != Register::RSP =>
        {
            Some(pop_r64)
        }
        _ => None,
    }
}

fn is_cmov(m: M) -> bool {
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    )
}

fn is_setcc(m: M) -> bool {
    matches!(
        m,
        M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

fn is_imm(k: OpKind) -> bool {
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
