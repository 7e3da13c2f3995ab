//! Bit instructions: BT/BTS/BTR/BTC, BSF/BSR, and TZCNT/LZCNT, which count where CPUID
//! advertises BMI1 (TZCNT) or ABM (LZCNT) and otherwise execute as BSF/BSR, exactly as on
//! hardware without them.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::operand::{ea, mask, mem_seg, sext};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    let size = cpu.op_size(ins, 0);
    match m {
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
            let bits = u64::from(size * 8);
            let raw = cpu.read_op(p, ins, 1)?;
            let reg_offset = ins.op1_kind() == OpKind::Register;
            let apply = |v: u64, bit: u64| -> Option<u64> {
                match m {
                    Mnemonic::Bts => Some(v | (1 << bit)),
                    Mnemonic::Btr => Some(v & !(1 << bit)),
                    Mnemonic::Btc => Some(v ^ (1 << bit)),
                    _ => None,
                }
            };
            let old_bit = if ins.op0_kind() == OpKind::Memory && reg_offset {
                // A register bit offset addresses memory beyond the operand (signed).
                let off = sext(raw & mask(size), size) as i64;
                let unit = off.div_euclid(bits as i64);
                let bit = off.rem_euclid(bits as i64) as u64;
                let addr = ea(cpu, ins).wrapping_add((unit * i64::from(size)) as u64);
                let seg = mem_seg(ins);
                // LOCKed, the unit is updated atomically like any locked operand (Linux's
                // set_bit/clear_bit with a variable bit number are LOCK BTS/BTR r, m).
                let v =
                    cpu.rmw_mem(p, seg, addr, size, ins.has_lock_prefix(), |v| apply(v, bit))?;
                (v >> bit) & 1
            } else {
                let bit = raw & (bits - 1);
                let v = cpu.rmw(p, ins, size, ins.has_lock_prefix(), |v| apply(v, bit))?;
                (v >> bit) & 1
            };
            cpu.set_flags_masked(if old_bit != 0 { CF } else { 0 }, CF);
            Ok(())
        }
        Mnemonic::Tzcnt | Mnemonic::Lzcnt if counts(cpu, m) => {
            let v = cpu.read_op(p, ins, 1)? & mask(size);
            let bits = u64::from(size * 8);
            let r = if v == 0 {
                bits
            } else if m == Mnemonic::Tzcnt {
                u64::from(v.trailing_zeros())
            } else {
                u64::from(v.leading_zeros()) - (64 - bits)
            };
            cpu.write_op(p, ins, 0, r)?;
            let f = if v == 0 { CF } else { 0 } | if r == 0 { ZF } else { 0 };
            cpu.set_flags_masked(f, CF | ZF);
            Ok(())
        }
        Mnemonic::Bsf | Mnemonic::Bsr | Mnemonic::Tzcnt | Mnemonic::Lzcnt => {
            let v = cpu.read_op(p, ins, 1)? & mask(size);
            if v == 0 {
                cpu.set_flags_masked(ZF, ZF);
                return Ok(());
            }
            let r = if matches!(m, Mnemonic::Bsf | Mnemonic::Tzcnt) {
                u64::from(v.trailing_zeros())
            } else {
                63 - u64::from(v.leading_zeros())
            };
            cpu.write_op(p, ins, 0, r)?;
            cpu.set_flags_masked(0, ZF);
            Ok(())
        }
        _ => Err(Fault::ud()),
    }
}

/// Whether the CPU model has TZCNT (BMI1) or LZCNT (ABM): without them the encodings
/// are REP BSF and REP BSR.
fn counts(cpu: &Core, m: Mnemonic) -> bool {
    if m == Mnemonic::Tzcnt {
        cpu.cpuid.lookup(7, 0).ebx & (1 << 3) != 0
    } else {
        cpu.cpuid.lookup(0x8000_0001, 0).ecx & (1 << 5) != 0
    }
}
