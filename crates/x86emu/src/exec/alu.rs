//! Integer arithmetic and logic: ADD/ADC/SUB/SBB/AND/OR/XOR/CMP/TEST/INC/DEC/NEG/NOT.

use iced_x86::{Instruction, Mnemonic};

use super::flags::{add_flags, logic_flags, sub_flags};
use super::operand::mask;
use crate::cpu::Core;
use crate::exceptions::Result;
use crate::platform::Platform;
use crate::state::flags::{CF, STATUS};

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    let size = cpu.op_size(ins, 0);
    let locked = ins.has_lock_prefix();
    let carry = u64::from(cpu.flag(CF));
    match m {
        Mnemonic::Cmp | Mnemonic::Test => {
            let a = cpu.read_op(p, ins, 0)?;
            let b = cpu.read_op(p, ins, 1)? & mask(size);
            let f = if m == Mnemonic::Cmp {
                sub_flags(a, b, 0, a.wrapping_sub(b), size)
            } else {
                logic_flags(a & b, size)
            };
            cpu.set_status(f);
        }
        Mnemonic::Add
        | Mnemonic::Adc
        | Mnemonic::Sub
        | Mnemonic::Sbb
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor => {
            let b = cpu.read_op(p, ins, 1)? & mask(size);
            let op = |a: u64| -> u64 {
                match m {
                    Mnemonic::Add => a.wrapping_add(b),
                    Mnemonic::Adc => a.wrapping_add(b).wrapping_add(carry),
                    Mnemonic::Sub => a.wrapping_sub(b),
                    Mnemonic::Sbb => a.wrapping_sub(b).wrapping_sub(carry),
                    Mnemonic::And => a & b,
                    Mnemonic::Or => a | b,
                    _ => a ^ b,
                }
            };
            let a = cpu.rmw(p, ins, size, locked, |a| Some(op(a) & mask(size)))?;
            let r = op(a);
            let f = match m {
                Mnemonic::Add => add_flags(a, b, 0, r, size),
                Mnemonic::Adc => add_flags(a, b, carry, r, size),
                Mnemonic::Sub => sub_flags(a, b, 0, r, size),
                Mnemonic::Sbb => sub_flags(a, b, carry, r, size),
                _ => logic_flags(r, size),
            };
            cpu.set_status(f);
        }
        Mnemonic::Inc | Mnemonic::Dec => {
            let inc = m == Mnemonic::Inc;
            let a = cpu.rmw(p, ins, size, locked, |a| {
                Some(
                    if inc {
                        a.wrapping_add(1)
                    } else {
                        a.wrapping_sub(1)
                    } & mask(size),
                )
            })?;
            let f = if inc {
                add_flags(a, 1, 0, a.wrapping_add(1), size)
            } else {
                sub_flags(a, 1, 0, a.wrapping_sub(1), size)
            };
            cpu.set_flags_masked(f, STATUS & !CF);
        }
        Mnemonic::Neg => {
            let a = cpu.rmw(p, ins, size, locked, |a| {
                Some(0u64.wrapping_sub(a) & mask(size))
            })?;
            cpu.set_status(sub_flags(0, a, 0, 0u64.wrapping_sub(a), size));
        }
        Mnemonic::Not => {
            cpu.rmw(p, ins, size, locked, |a| Some(!a & mask(size)))?;
        }
        _ => return Err(crate::exceptions::Fault::ud()),
    }
    Ok(())
}
