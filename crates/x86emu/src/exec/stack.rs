//! Stack instructions: PUSH/POP (GPR, memory, immediate, segment), PUSHF/POPF, ENTER/LEAVE,
//! PUSHA/POPA.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::operand::{mask, reg_read, reg_write};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;

impl Core {
    /// RFLAGS update rules of POPF/IRET: IOPL only at CPL0, IF only when CPL <= IOPL.
    pub(crate) fn write_flags_checked(&mut self, v: u64, size: u32) {
        let cpl = u64::from(self.s.cpl());
        let iopl = (self.s.rflags & IOPL) >> 12;
        let mut writable = WRITABLE & !RF;
        if cpl != 0 {
            writable &= !IOPL;
            if cpl > iopl {
                writable &= !IF;
            }
        }
        writable &= mask(size);
        self.s.rflags = ((self.s.rflags & !writable) | (v & writable)) | FIXED1;
    }
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    match ins.mnemonic() {
        Mnemonic::Push => {
            let size = cpu.stack_op_size(ins);
            let v = if ins.op0_kind() == OpKind::Register
                && ins.op0_register().is_segment_register()
            {
                u64::from(cpu.s.seg[super::operand::seg_of(ins.op0_register()) as usize].selector)
            } else {
                cpu.read_op(p, ins, 0)?
            };
            cpu.push(p, v & mask(size), size)
        }
        Mnemonic::Pop => {
            let size = cpu.stack_op_size(ins);
            if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() {
                let v = cpu.peek(p, 0, size)?;
                let seg = super::operand::seg_of(ins.op0_register());
                cpu.load_seg(p, seg, v as u16)?;
                let sp = cpu.rsp_masked().wrapping_add(u64::from(size));
                cpu.set_rsp_masked(sp);
                if seg == crate::state::Seg::Ss {
                    cpu.new_shadow = true;
                }
                return Ok(());
            }
            let v = cpu.peek(p, 0, size)?;
            let old_rsp = cpu.s.gpr[4];
            let sp = cpu.rsp_masked().wrapping_add(u64::from(size));
            cpu.set_rsp_masked(sp);
            // The destination address uses the incremented RSP (SDM POP).
            if let Err(e) = cpu.write_op(p, ins, 0, v) {
                cpu.s.gpr[4] = old_rsp;
                return Err(e);
            }
            Ok(())
        }
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            let size = cpu.stack_op_size(ins);
            // VM and RF are never pushed.
            let v = cpu.s.rflags & !(RF | VM);
            cpu.push(p, v & mask(size), size)
        }
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
            let size = cpu.stack_op_size(ins);
            let v = cpu.pop(p, size)?;
            cpu.write_flags_checked(v, size);
            Ok(())
        }
        Mnemonic::Leave => {
            let size = match ins.code() {
                Code::Leavew => 2,
                Code::Leaved => 4,
                _ => 8,
            };
            let ss = cpu.stack_size();
            let bp = cpu.s.gpr[5] & mask(ss);
            let v = cpu.read_mem(p, crate::state::Seg::Ss, bp, size)?;
            cpu.set_rsp_masked(bp.wrapping_add(u64::from(size)));
            let r = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            reg_write(cpu, r, v);
            Ok(())
        }
        Mnemonic::Enter => {
            let size = match ins.code() {
                Code::Enterw_imm16_imm8 => 2,
                Code::Enterd_imm16_imm8 => 4,
                _ => 8,
            };
            let alloc = u64::from(ins.immediate16());
            let level = u64::from(ins.immediate8_2nd() & 31);
            let ss = cpu.stack_size();
            let saved = cpu.s.gpr;
            let res = (|| -> Result<()> {
                let bp_reg = match size {
                    2 => Register::BP,
                    4 => Register::EBP,
                    _ => Register::RBP,
                };
                let bp = reg_read(cpu, bp_reg);
                cpu.push(p, bp, size)?;
                let frame = cpu.rsp_masked();
                if level > 0 {
                    let mut walk = cpu.s.gpr[5] & mask(ss);
                    for _ in 1..level {
                        walk = walk.wrapping_sub(u64::from(size)) & mask(ss);
                        let v = cpu.read_mem(p, crate::state::Seg::Ss, walk, size)?;
                        cpu.push(p, v, size)?;
                    }
                    cpu.push(p, frame, size)?;
                }
                reg_write(cpu, bp_reg, frame);
                let sp = cpu.rsp_masked().wrapping_sub(alloc);
                // Probe the new stack top like hardware does before committing RSP.
                cpu.seg_lin(crate::state::Seg::Ss, sp & mask(ss), 1)?;
                cpu.set_rsp_masked(sp);
                Ok(())
            })();
            if res.is_err() {
                cpu.s.gpr = saved;
            }
            res
        }
        Mnemonic::Pusha | Mnemonic::Pushad => {
            let size = if ins.mnemonic() == Mnemonic::Pusha {
                2
            } else {
                4
            };
            let saved = cpu.s.gpr;
            let sp0 = cpu.s.gpr[4];
            for i in 0..8 {
                let v = if i == 4 { sp0 } else { cpu.s.gpr[i] };
                if let Err(e) = cpu.push(p, v & mask(size), size) {
                    cpu.s.gpr = saved;
                    return Err(e);
                }
            }
            Ok(())
        }
        Mnemonic::Popa | Mnemonic::Popad => {
            let size = if ins.mnemonic() == Mnemonic::Popa {
                2
            } else {
                4
            };
            let mut vals = [0u64; 8];
            for (i, v) in vals.iter_mut().enumerate() {
                *v = cpu.peek(p, (7 - i as u64) * u64::from(size), size)?;
            }
            for (i, v) in vals.iter().enumerate() {
                if i != 4 {
                    let r = if size == 2 {
                        Register::AX
                    } else {
                        Register::EAX
                    };
                    reg_write(cpu, nth_reg(r, i), *v);
                }
            }
            let sp = cpu.rsp_masked().wrapping_add(u64::from(size) * 8);
            cpu.set_rsp_masked(sp);
            Ok(())
        }
        _ => Err(Fault::ud()),
    }
}

/// The i-th register (in encoding order) of the same width as `first`.
fn nth_reg(first: Register, i: usize) -> Register {
    const R16: [Register; 8] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
    ];
    const R32: [Register; 8] = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
    ];
    let t = if first == Register::AX { &R16 } else { &R32 };
    t.get(i).copied().unwrap_or(first)
}
