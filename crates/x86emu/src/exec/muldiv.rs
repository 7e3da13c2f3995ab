//! MUL/IMUL/DIV/IDIV.

use iced_x86::{Instruction, Mnemonic};

use super::flags::szp;
use super::operand::{mask, sext};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;

/// Reads the implicit accumulator pair: (low = AL/AX/EAX/RAX, high = AH/DX/EDX/RDX).
fn acc(cpu: &Core, size: u32) -> (u64, u64) {
    let g = &cpu.s.gpr;
    match size {
        1 => (g[0] & 0xff, (g[0] >> 8) & 0xff),
        _ => (g[0] & mask(size), g[2] & mask(size)),
    }
}

fn set_acc(cpu: &mut Core, size: u32, lo: u64, hi: u64) {
    use super::operand::reg_write;
    use iced_x86::Register as R;
    match size {
        1 => reg_write(cpu, R::AX, (lo & 0xff) | ((hi & 0xff) << 8)),
        2 => {
            reg_write(cpu, R::AX, lo);
            reg_write(cpu, R::DX, hi);
        }
        4 => {
            reg_write(cpu, R::EAX, lo);
            reg_write(cpu, R::EDX, hi);
        }
        _ => {
            cpu.s.gpr[0] = lo;
            cpu.s.gpr[2] = hi;
        }
    }
}

/// Flags after a multiply: CF=OF=overflow; SF/ZF/PF from the low half (undefined
/// architecturally; this matches what recent CPUs produce often enough to be harmless).
pub(crate) fn mul_flags(lo: u64, size: u32, overflow: bool) -> u64 {
    let mut f = szp(lo, size);
    if overflow {
        f |= CF | OF;
    }
    f
}

/// Signed `a * b` truncated to `size` bytes, and whether the truncation lost bits.
#[inline(always)]
pub(crate) fn imul_truncated(a: u64, b: u64, size: u32) -> (u64, bool) {
    let full = i128::from(sext(a & mask(size), size) as i64)
        * i128::from(sext(b & mask(size), size) as i64);
    let lo = (full as u64) & mask(size);
    (lo, full != i128::from(sext(lo, size) as i64))
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    match (m, ins.op_count()) {
        (Mnemonic::Mul, 1) | (Mnemonic::Imul, 1) => {
            let size = cpu.op_size(ins, 0);
            let bits = size * 8;
            let src = cpu.read_op(p, ins, 0)? & mask(size);
            let (a, _) = acc(cpu, size);
            let (lo, hi, of) = if m == Mnemonic::Mul {
                let full = u128::from(a) * u128::from(src);
                let lo = (full as u64) & mask(size);
                let hi = ((full >> bits) as u64) & mask(size);
                (lo, hi, hi != 0)
            } else {
                let full = i128::from(sext(a, size) as i64) * i128::from(sext(src, size) as i64);
                let lo = (full as u64) & mask(size);
                let hi = ((full >> bits) as u64) & mask(size);
                (lo, hi, full != i128::from(sext(lo, size) as i64))
            };
            set_acc(cpu, size, lo, hi);
            cpu.set_status(mul_flags(lo, size, of));
            Ok(())
        }
        (Mnemonic::Imul, 2) | (Mnemonic::Imul, 3) => {
            let size = cpu.op_size(ins, 0);
            let (a, b) = if ins.op_count() == 2 {
                (cpu.read_op(p, ins, 0)?, cpu.read_op(p, ins, 1)?)
            } else {
                (cpu.read_op(p, ins, 1)?, cpu.read_op(p, ins, 2)?)
            };
            let (lo, of) = imul_truncated(a, b, size);
            cpu.write_op(p, ins, 0, lo)?;
            cpu.set_status(mul_flags(lo, size, of));
            Ok(())
        }
        (Mnemonic::Div, _) | (Mnemonic::Idiv, _) => {
            let size = cpu.op_size(ins, 0);
            let bits = size * 8;
            let src = cpu.read_op(p, ins, 0)? & mask(size);
            if src == 0 {
                return Err(Fault::de());
            }
            let (lo, hi) = acc(cpu, size);
            let (q, r) = if m == Mnemonic::Div {
                let n = (u128::from(hi) << bits) | u128::from(lo);
                let q = n / u128::from(src);
                if q > u128::from(mask(size)) {
                    return Err(Fault::de());
                }
                (q as u64, (n % u128::from(src)) as u64)
            } else {
                let n = ((u128::from(hi) << bits) | u128::from(lo)) as i128;
                // Sign-extend the 2*bits-wide dividend.
                let n = (n << (128 - 2 * bits)) >> (128 - 2 * bits);
                let d = i128::from(sext(src, size) as i64);
                let q = n.checked_div(d).ok_or(Fault::de())?;
                let r = n.checked_rem(d).ok_or(Fault::de())?;
                let lim = 1i128 << (bits - 1);
                if q >= lim || q < -lim {
                    return Err(Fault::de());
                }
                (q as u64 & mask(size), r as u64 & mask(size))
            };
            set_acc(cpu, size, q, r);
            Ok(())
        }
        _ => Err(Fault::ud()),
    }
}
