//! Shifts and rotates: SHL/SAL/SHR/SAR/ROL/ROR/RCL/RCR/SHLD/SHRD.

use iced_x86::{Instruction, Mnemonic};

use super::flags::szp;
use super::operand::{mask, sext, sign_bit};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    let size = cpu.op_size(ins, 0);
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let (count, other) = match m {
        Mnemonic::Shld | Mnemonic::Shrd => {
            (cpu.read_op(p, ins, 2)? & cmask, cpu.read_op(p, ins, 1)?)
        }
        _ => {
            let c = if ins.op_count() > 1 {
                cpu.read_op(p, ins, 1)?
            } else {
                1
            };
            (c & cmask, 0)
        }
    };
    if count == 0 {
        // Still touches memory like hardware does (fault behaviour), but changes nothing —
        // except that a 32-bit register destination is zero-extended as on any write.
        let v = cpu.read_op(p, ins, 0)?;
        if ins.op0_kind() == iced_x86::OpKind::Register && ins.op0_register().is_gpr32() {
            cpu.write_op(p, ins, 0, v)?;
        }
        return Ok(());
    }
    let cf_in = u64::from(cpu.flag(CF));
    let c = count as u32;
    let compute = |a: u64| compute(m, a, c, size, cf_in, other);
    match m {
        Mnemonic::Shl
        | Mnemonic::Sal
        | Mnemonic::Shr
        | Mnemonic::Sar
        | Mnemonic::Rol
        | Mnemonic::Ror
        | Mnemonic::Rcl
        | Mnemonic::Rcr
        | Mnemonic::Shld
        | Mnemonic::Shrd => {}
        _ => return Err(Fault::ud()),
    }
    let old = cpu.rmw(p, ins, size, false, |a| Some(compute(a).0))?;
    let (_, f, which) = compute(old);
    cpu.set_flags_masked(f, which);
    Ok(())
}

/// Result, flags and the set of flags written for a shift/rotate of `a` by a nonzero
/// masked count `c` (`other` is the second SHLD/SHRD source).
#[inline(always)]
pub(crate) fn compute(
    m: Mnemonic,
    a: u64,
    c: u32,
    size: u32,
    cf_in: u64,
    other: u64,
) -> (u64, u64, u64) {
    let bits = size * 8;
    let m_all = mask(size);
    let sb = sign_bit(size);
    let a = a & m_all;
    match m {
        Mnemonic::Shl | Mnemonic::Sal => {
            let r = if c >= 64 { 0 } else { (a << c) & m_all };
            let cf = if c <= bits { (a >> (bits - c)) & 1 } else { 0 };
            let mut f = szp(r, size) | if cf != 0 { CF } else { 0 };
            if ((r & sb != 0) as u64) ^ cf != 0 {
                f |= OF;
            }
            (r, f, STATUS)
        }
        Mnemonic::Shr => {
            let r = if c >= 64 { 0 } else { a >> c };
            let cf = if c <= bits { (a >> (c - 1)) & 1 } else { 0 };
            let mut f = szp(r, size) | if cf != 0 { CF } else { 0 };
            if a & sb != 0 {
                f |= OF;
            }
            (r, f, STATUS)
        }
        Mnemonic::Sar => {
            let sa = sext(a, size) as i64;
            let r = (sa >> c.min(63)) as u64 & m_all;
            let cf = ((sa >> (c - 1).min(63)) & 1) as u64;
            let f = szp(r, size) | if cf != 0 { CF } else { 0 };
            (r, f, STATUS)
        }
        Mnemonic::Rol => {
            let k = c % bits;
            let r = if k == 0 {
                a
            } else {
                ((a << k) | (a >> (bits - k))) & m_all
            };
            let cf = r & 1;
            let mut f = if cf != 0 { CF } else { 0 };
            if ((r & sb != 0) as u64) ^ cf != 0 {
                f |= OF;
            }
            (r, f, CF | OF)
        }
        Mnemonic::Ror => {
            let k = c % bits;
            let r = if k == 0 {
                a
            } else {
                ((a >> k) | (a << (bits - k))) & m_all
            };
            let msb = (r & sb != 0) as u64;
            let msb1 = (r & (sb >> 1) != 0) as u64;
            let mut f = if msb != 0 { CF } else { 0 };
            if msb ^ msb1 != 0 {
                f |= OF;
            }
            (r, f, CF | OF)
        }
        Mnemonic::Rcl | Mnemonic::Rcr => {
            let k = c % (bits + 1);
            if k == 0 {
                return (a, 0, 0);
            }
            // Rotate through a (bits+1)-wide value with CF as the top bit; u128 avoids
            // overflow at 64 bits.
            let w = bits + 1;
            let full = (u128::from(cf_in) << bits) | u128::from(a);
            let wm = (1u128 << w) - 1;
            let rot = if m == Mnemonic::Rcl {
                ((full << k) | (full >> (w - k))) & wm
            } else {
                ((full >> k) | (full << (w - k))) & wm
            };
            let r = (rot as u64) & m_all;
            let cf = ((rot >> bits) & 1) as u64;
            let mut f = if cf != 0 { CF } else { 0 };
            let of = if m == Mnemonic::Rcl {
                ((r & sb != 0) as u64) ^ cf
            } else {
                ((r & sb != 0) as u64) ^ ((r & (sb >> 1) != 0) as u64)
            };
            if of != 0 {
                f |= OF;
            }
            (r, f, CF | OF)
        }
        Mnemonic::Shld => {
            let b = other & m_all;
            // Concatenate dest:src and shift left; counts above the width are undefined.
            let full = (u128::from(a) << bits) | u128::from(b);
            let wide = full << c;
            let r = ((wide >> bits) as u64) & m_all;
            let cf = ((full >> (2 * bits - c).min(127)) & 1) as u64;
            let mut f = szp(r, size) | if cf != 0 { CF } else { 0 };
            if (r ^ a) & sb != 0 {
                f |= OF;
            }
            (r, f, STATUS)
        }
        _ => {
            // SHRD
            let b = other & m_all;
            let full = (u128::from(b) << bits) | u128::from(a);
            let r = ((full >> c) as u64) & m_all;
            let cf = ((full >> (c - 1)) & 1) as u64;
            let mut f = szp(r, size) | if cf != 0 { CF } else { 0 };
            if (r ^ a) & sb != 0 {
                f |= OF;
            }
            (r, f, STATUS)
        }
    }
}
