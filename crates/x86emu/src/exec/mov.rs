//! Data movement: MOV/MOVZX/MOVSX/MOVSXD/LEA/XCHG/CMOVcc/SETcc/BSWAP, sign extensions,
//! flag transfers (LAHF/SAHF/CLC/STC/CMC/CLD/STD), XLAT, NOP.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::operand::{ea, mask, mem_seg, reg_read, reg_write, sext};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    match ins.mnemonic() {
        Mnemonic::Mov => {
            if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register()
                || ins.op1_kind() == OpKind::Register && ins.op1_register().is_segment_register()
            {
                return super::system::mov_sreg(cpu, p, ins);
            }
            let r0 = ins.op0_register();
            if r0.is_cr() || r0.is_dr() || ins.op1_register().is_cr() || ins.op1_register().is_dr()
            {
                return super::system::mov_crdr(cpu, p, ins);
            }
            let v = cpu.read_op(p, ins, 1)?;
            cpu.write_op(p, ins, 0, v)
        }
        Mnemonic::Movzx => {
            let v = cpu.read_op(p, ins, 1)?;
            cpu.write_op(p, ins, 0, v)
        }
        Mnemonic::Movsx | Mnemonic::Movsxd => {
            let from = cpu.op_size(ins, 1);
            let to = cpu.op_size(ins, 0);
            let v = sext(cpu.read_op(p, ins, 1)?, from) & mask(to);
            cpu.write_op(p, ins, 0, v)
        }
        Mnemonic::Lea => {
            let v = ea(cpu, ins);
            let size = cpu.op_size(ins, 0);
            cpu.write_op(p, ins, 0, v & mask(size))
        }
        Mnemonic::Xchg => {
            if ins.op0_kind() == OpKind::Register && ins.op1_kind() == OpKind::Register {
                let a = cpu.read_op(p, ins, 0)?;
                let b = cpu.read_op(p, ins, 1)?;
                cpu.write_op(p, ins, 0, b)?;
                return cpu.write_op(p, ins, 1, a);
            }
            // Memory form: always locked. Operand 0 is the memory operand in iced's decoding
            // of 86/87; the register may be either operand.
            let (mem_i, reg_i) = if ins.op0_kind() == OpKind::Memory {
                (0, 1)
            } else {
                (1, 0)
            };
            let size = cpu.op_size(ins, reg_i);
            let r = cpu.read_op(p, ins, reg_i)?;
            let old = if mem_i == 0 {
                cpu.rmw(p, ins, size, true, |_| Some(r))?
            } else {
                let off = ea(cpu, ins);
                let seg = mem_seg(ins);
                let old = cpu.read_mem(p, seg, off, size)?;
                cpu.write_mem(p, seg, off, size, r)?;
                old
            };
            cpu.write_op(p, ins, reg_i, old)
        }
        Mnemonic::Cmovo
        | Mnemonic::Cmovno
        | Mnemonic::Cmovb
        | Mnemonic::Cmovae
        | Mnemonic::Cmove
        | Mnemonic::Cmovne
        | Mnemonic::Cmovbe
        | Mnemonic::Cmova
        | Mnemonic::Cmovs
        | Mnemonic::Cmovns
        | Mnemonic::Cmovp
        | Mnemonic::Cmovnp
        | Mnemonic::Cmovl
        | Mnemonic::Cmovge
        | Mnemonic::Cmovle
        | Mnemonic::Cmovg => {
            // The source is read (and may fault) whether or not the move happens.
            let v = cpu.read_op(p, ins, 1)?;
            if cpu.cond(ins.condition_code()) {
                cpu.write_op(p, ins, 0, v)
            } else {
                // A 32-bit destination is zero-extended even when the condition is false.
                let r = ins.op0_register();
                if r.is_gpr32() {
                    let cur = reg_read(cpu, r);
                    reg_write(cpu, r, cur);
                }
                Ok(())
            }
        }
        Mnemonic::Seto
        | Mnemonic::Setno
        | Mnemonic::Setb
        | Mnemonic::Setae
        | Mnemonic::Sete
        | Mnemonic::Setne
        | Mnemonic::Setbe
        | Mnemonic::Seta
        | Mnemonic::Sets
        | Mnemonic::Setns
        | Mnemonic::Setp
        | Mnemonic::Setnp
        | Mnemonic::Setl
        | Mnemonic::Setge
        | Mnemonic::Setle
        | Mnemonic::Setg => {
            let v = u64::from(cpu.cond(ins.condition_code()));
            cpu.write_op(p, ins, 0, v)
        }
        Mnemonic::Bswap => {
            let r = ins.op0_register();
            let v = reg_read(cpu, r);
            let out = if r.is_gpr64() {
                v.swap_bytes()
            } else if r.is_gpr32() {
                u64::from((v as u32).swap_bytes())
            } else {
                // 16-bit BSWAP is undefined; hardware clears the register.
                0
            };
            reg_write(cpu, r, out);
            Ok(())
        }
        Mnemonic::Cbw => {
            let v = sext(cpu.s.gpr[0] & 0xff, 1) & 0xffff;
            reg_write(cpu, iced_x86::Register::AX, v);
            Ok(())
        }
        Mnemonic::Cwde => {
            cpu.s.gpr[0] = sext(cpu.s.gpr[0] & 0xffff, 2) & 0xffff_ffff;
            Ok(())
        }
        Mnemonic::Cdqe => {
            cpu.s.gpr[0] = sext(cpu.s.gpr[0] & 0xffff_ffff, 4);
            Ok(())
        }
        Mnemonic::Cwd => {
            let hi = if cpu.s.gpr[0] & 0x8000 != 0 {
                0xffff
            } else {
                0
            };
            reg_write(cpu, iced_x86::Register::DX, hi);
            Ok(())
        }
        Mnemonic::Cdq => {
            cpu.s.gpr[2] = if cpu.s.gpr[0] & 0x8000_0000 != 0 {
                0xffff_ffff
            } else {
                0
            };
            Ok(())
        }
        Mnemonic::Cqo => {
            cpu.s.gpr[2] = if cpu.s.gpr[0] & (1 << 63) != 0 {
                u64::MAX
            } else {
                0
            };
            Ok(())
        }
        Mnemonic::Lahf => {
            let ah = (cpu.s.rflags & (SF | ZF | AF | PF | CF)) | FIXED1;
            reg_write(cpu, iced_x86::Register::AH, ah);
            Ok(())
        }
        Mnemonic::Sahf => {
            let ah = reg_read(cpu, iced_x86::Register::AH);
            cpu.set_flags_masked(ah, SF | ZF | AF | PF | CF);
            Ok(())
        }
        Mnemonic::Clc => {
            cpu.s.rflags &= !CF;
            Ok(())
        }
        Mnemonic::Stc => {
            cpu.s.rflags |= CF;
            Ok(())
        }
        Mnemonic::Cmc => {
            cpu.s.rflags ^= CF;
            Ok(())
        }
        Mnemonic::Cld => {
            cpu.s.rflags &= !DF;
            Ok(())
        }
        Mnemonic::Std => {
            cpu.s.rflags |= DF;
            Ok(())
        }
        Mnemonic::Xlatb => {
            let base = ea(cpu, ins);
            let v = cpu.read_mem(p, mem_seg(ins), base, 1)?;
            reg_write(cpu, iced_x86::Register::AL, v);
            Ok(())
        }
        Mnemonic::Pause => {
            cpu.jit.pauses = cpu.jit.pauses.saturating_add(1);
            Ok(())
        }
        Mnemonic::Nop | Mnemonic::Endbr64 | Mnemonic::Endbr32 => Ok(()),
        _ => Err(Fault::ud()),
    }
}
