//! SSE/SSE2 floating-point instructions: packed and scalar arithmetic, min/max, sqrt,
//! compares, conversions. The IEEE arithmetic itself is in `softfloat.rs`.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::operand::reg_write;
use super::softfloat::{
    arith, compare, f32_to_f64, f64_to_f32, from_int_f32, from_int_f64, minmax, sqrt, to_int, Fp,
    Op, DE, IE,
};
use super::sse::{dst_write, from_u32s, from_u64s, get_x, src, u32s, u64s};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::{AF, CF, OF, PF, SF, ZF};

fn f32v(x: u32) -> f32 {
    f32::from_bits(x)
}
fn f64v(x: u64) -> f64 {
    f64::from_bits(x)
}

/// Mnemonics this file implements; anything else that reaches it is undefined.
fn implemented(m: M) -> bool {
    matches!(
        m,
        M::Addps
            | M::Addpd
            | M::Addss
            | M::Addsd
            | M::Subps
            | M::Subpd
            | M::Subss
            | M::Subsd
            | M::Mulps
            | M::Mulpd
            | M::Mulss
            | M::Mulsd
            | M::Divps
            | M::Divpd
            | M::Divss
            | M::Divsd
            | M::Minps
            | M::Minpd
            | M::Minss
            | M::Minsd
            | M::Maxps
            | M::Maxpd
            | M::Maxss
            | M::Maxsd
            | M::Sqrtps
            | M::Sqrtpd
            | M::Sqrtss
            | M::Sqrtsd
            | M::Cmpps
            | M::Cmppd
            | M::Cmpss
            | M::Cmpsd
            | M::Ucomiss
            | M::Comiss
            | M::Ucomisd
            | M::Comisd
            | M::Cvtsi2ss
            | M::Cvtsi2sd
            | M::Cvtss2si
            | M::Cvttss2si
            | M::Cvtsd2si
            | M::Cvttsd2si
            | M::Cvtss2sd
            | M::Cvtsd2ss
            | M::Cvtps2pd
            | M::Cvtpd2ps
            | M::Cvtdq2ps
            | M::Cvtdq2pd
            | M::Cvtps2dq
            | M::Cvttps2dq
            | M::Cvtpd2dq
            | M::Cvttpd2dq
    )
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    // Unknown instructions are #UD whatever CR0.TS says.
    if !implemented(m) {
        return super::hostexec::exec(cpu, p, ins);
    }
    cpu.sse_check()?;
    let mx = cpu.s.fpu.mxcsr;
    let mut fl = 0u32;
    let lo64 = u128::from(u64::MAX);
    let lo32 = 0xffff_ffffu128;
    let arith_op = match m {
        M::Addps | M::Addpd | M::Addss | M::Addsd => Some(Op::Add),
        M::Subps | M::Subpd | M::Subss | M::Subsd => Some(Op::Sub),
        M::Mulps | M::Mulpd | M::Mulss | M::Mulsd => Some(Op::Mul),
        M::Divps | M::Divpd | M::Divss | M::Divsd => Some(Op::Div),
        _ => None,
    };
    let d = if ins.op0_kind() == OpKind::Register && ins.op0_register().is_xmm() {
        get_x(cpu, ins.op0_register())
    } else {
        0
    };
    let result: u128 = match m {
        _ if arith_op.is_some()
            || matches!(
                m,
                M::Minps
                    | M::Minpd
                    | M::Minss
                    | M::Minsd
                    | M::Maxps
                    | M::Maxpd
                    | M::Maxss
                    | M::Maxsd
            ) =>
        {
            let s = src(cpu, p, ins, 1)?;
            let f32op = |a: u32, b: u32, fl: &mut u32| -> u32 {
                let (r, f) = match arith_op {
                    Some(op) => arith(op, f32v(a), f32v(b), mx),
                    None => minmax(matches!(m, M::Maxps | M::Maxss), f32v(a), f32v(b)),
                };
                *fl |= f;
                r.to_bits()
            };
            let f64op = |a: u64, b: u64, fl: &mut u32| -> u64 {
                let (r, f) = match arith_op {
                    Some(op) => arith(op, f64v(a), f64v(b), mx),
                    None => minmax(matches!(m, M::Maxpd | M::Maxsd), f64v(a), f64v(b)),
                };
                *fl |= f;
                r.to_bits()
            };
            match m {
                M::Addps | M::Subps | M::Mulps | M::Divps | M::Minps | M::Maxps => {
                    let (x, y) = (u32s(d), u32s(s));
                    let mut o = [0u32; 4];
                    for i in 0..4 {
                        o[i] = f32op(x[i], y[i], &mut fl);
                    }
                    from_u32s(o)
                }
                M::Addpd | M::Subpd | M::Mulpd | M::Divpd | M::Minpd | M::Maxpd => {
                    let (x, y) = (u64s(d), u64s(s));
                    from_u64s([f64op(x[0], y[0], &mut fl), f64op(x[1], y[1], &mut fl)])
                }
                M::Addss | M::Subss | M::Mulss | M::Divss | M::Minss | M::Maxss => {
                    (d & !lo32) | u128::from(f32op(d as u32, s as u32, &mut fl))
                }
                _ => (d & !lo64) | u128::from(f64op(d as u64, s as u64, &mut fl)),
            }
        }
        M::Sqrtps | M::Sqrtpd | M::Sqrtss | M::Sqrtsd => {
            let s = src(cpu, p, ins, 1)?;
            match m {
                M::Sqrtps => {
                    let mut o = u32s(s);
                    for x in o.iter_mut() {
                        let (r, f) = sqrt(f32v(*x), mx);
                        fl |= f;
                        *x = r.to_bits();
                    }
                    from_u32s(o)
                }
                M::Sqrtpd => {
                    let mut o = u64s(s);
                    for x in o.iter_mut() {
                        let (r, f) = sqrt(f64v(*x), mx);
                        fl |= f;
                        *x = r.to_bits();
                    }
                    from_u64s(o)
                }
                M::Sqrtss => {
                    let (r, f) = sqrt(f32v(s as u32), mx);
                    fl |= f;
                    (d & !lo32) | u128::from(r.to_bits())
                }
                _ => {
                    let (r, f) = sqrt(f64v(s as u64), mx);
                    fl |= f;
                    (d & !lo64) | u128::from(r.to_bits())
                }
            }
        }
        M::Cmpps | M::Cmppd | M::Cmpss | M::Cmpsd => {
            let s = src(cpu, p, ins, 1)?;
            let pred = ins.immediate8();
            match m {
                M::Cmpps => {
                    let (x, y) = (u32s(d), u32s(s));
                    let mut o = [0u32; 4];
                    for i in 0..4 {
                        let (r, f) = compare(pred, f32v(x[i]), f32v(y[i]));
                        fl |= f;
                        o[i] = if r { u32::MAX } else { 0 };
                    }
                    from_u32s(o)
                }
                M::Cmppd => {
                    let (x, y) = (u64s(d), u64s(s));
                    let mut o = [0u64; 2];
                    for i in 0..2 {
                        let (r, f) = compare(pred, f64v(x[i]), f64v(y[i]));
                        fl |= f;
                        o[i] = if r { u64::MAX } else { 0 };
                    }
                    from_u64s(o)
                }
                M::Cmpss => {
                    let (r, f) = compare(pred, f32v(d as u32), f32v(s as u32));
                    fl |= f;
                    (d & !lo32) | if r { lo32 } else { 0 }
                }
                _ => {
                    let (r, f) = compare(pred, f64v(d as u64), f64v(s as u64));
                    fl |= f;
                    (d & !lo64) | if r { lo64 } else { 0 }
                }
            }
        }
        M::Ucomiss | M::Comiss | M::Ucomisd | M::Comisd => {
            let s = src(cpu, p, ins, 1)?;
            let signaling = matches!(m, M::Comiss | M::Comisd);
            let (unord, lt, eq, f) = if matches!(m, M::Ucomiss | M::Comiss) {
                let (a, b) = (f32v(d as u32), f32v(s as u32));
                let un = a.is_nan() || b.is_nan();
                let f = if Fp::is_snan(a) || Fp::is_snan(b) || (un && signaling) {
                    IE
                } else if !un && (Fp::is_denormal(a) || Fp::is_denormal(b)) {
                    DE
                } else {
                    0
                };
                (un, a < b, a == b, f)
            } else {
                let (a, b) = (f64v(d as u64), f64v(s as u64));
                let un = a.is_nan() || b.is_nan();
                let f = if Fp::is_snan(a) || Fp::is_snan(b) || (un && signaling) {
                    IE
                } else if !un && (Fp::is_denormal(a) || Fp::is_denormal(b)) {
                    DE
                } else {
                    0
                };
                (un, a < b, a == b, f)
            };
            fl |= f;
            let flags = if unord {
                ZF | PF | CF
            } else if lt {
                CF
            } else if eq {
                ZF
            } else {
                0
            };
            commit_flags(cpu, fl)?;
            cpu.set_flags_masked(flags, ZF | PF | CF | OF | SF | AF);
            return Ok(());
        }
        M::Cvtsi2ss | M::Cvtsi2sd => {
            let size = cpu.op_size(ins, 1);
            let v = super::operand::sext(cpu.read_op(p, ins, 1)?, size) as i64;
            if m == M::Cvtsi2sd {
                let (r, f) = from_int_f64(v, mx);
                fl |= f;
                (d & !lo64) | u128::from(r.to_bits())
            } else {
                let (r, f) = from_int_f32(v, mx);
                fl |= f;
                (d & !lo32) | u128::from(r.to_bits())
            }
        }
        M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si => {
            let s = src(cpu, p, ins, 1)?;
            let bits = (cpu.op_size(ins, 0) * 8).max(32);
            let trunc = matches!(m, M::Cvttss2si | M::Cvttsd2si);
            let (v, f) = if matches!(m, M::Cvtss2si | M::Cvttss2si) {
                to_int(f32v(s as u32), bits, trunc, mx)
            } else {
                to_int(f64v(s as u64), bits, trunc, mx)
            };
            commit_flags(cpu, f)?;
            reg_write(cpu, ins.op0_register(), v);
            return Ok(());
        }
        M::Cvtss2sd => {
            let s = src(cpu, p, ins, 1)?;
            let (r, f) = f32_to_f64(f32v(s as u32));
            fl |= f;
            (d & !lo64) | u128::from(r.to_bits())
        }
        M::Cvtsd2ss => {
            let s = src(cpu, p, ins, 1)?;
            let (r, f) = f64_to_f32(f64v(s as u64), mx);
            fl |= f;
            (d & !lo32) | u128::from(r.to_bits())
        }
        M::Cvtps2pd => {
            let s = src(cpu, p, ins, 1)?;
            let x = u32s(s);
            let (a, f1) = f32_to_f64(f32v(x[0]));
            let (b, f2) = f32_to_f64(f32v(x[1]));
            fl |= f1 | f2;
            from_u64s([a.to_bits(), b.to_bits()])
        }
        M::Cvtpd2ps => {
            let s = src(cpu, p, ins, 1)?;
            let x = u64s(s);
            let (a, f1) = f64_to_f32(f64v(x[0]), mx);
            let (b, f2) = f64_to_f32(f64v(x[1]), mx);
            fl |= f1 | f2;
            from_u32s([a.to_bits(), b.to_bits(), 0, 0])
        }
        M::Cvtdq2ps => {
            let s = src(cpu, p, ins, 1)?;
            let mut o = u32s(s);
            for x in o.iter_mut() {
                let (r, f) = from_int_f32(i64::from(*x as i32), mx);
                fl |= f;
                *x = r.to_bits();
            }
            from_u32s(o)
        }
        M::Cvtdq2pd => {
            let s = src(cpu, p, ins, 1)?;
            let x = u32s(s);
            from_u64s([
                f64::from(x[0] as i32).to_bits(),
                f64::from(x[1] as i32).to_bits(),
            ])
        }
        M::Cvtps2dq | M::Cvttps2dq => {
            let s = src(cpu, p, ins, 1)?;
            let mut o = u32s(s);
            for x in o.iter_mut() {
                let (r, f) = to_int(f32v(*x), 32, m == M::Cvttps2dq, mx);
                fl |= f;
                *x = r as u32;
            }
            from_u32s(o)
        }
        M::Cvtpd2dq | M::Cvttpd2dq => {
            let s = src(cpu, p, ins, 1)?;
            let x = u64s(s);
            let (a, f1) = to_int(f64v(x[0]), 32, m == M::Cvttpd2dq, mx);
            let (b, f2) = to_int(f64v(x[1]), 32, m == M::Cvttpd2dq, mx);
            fl |= f1 | f2;
            from_u32s([a as u32, b as u32, 0, 0])
        }
        _ => return Err(Fault::ud()),
    };
    // Flags are only committed once the operands were read (a memory fault above leaves
    // MXCSR untouched); an unmasked exception leaves the destination unchanged.
    commit_flags(cpu, fl)?;
    dst_write(cpu, p, ins, result)
}

/// Records exception flags in MXCSR and raises #XM (or #UD without CR4.OSXMMEXCPT) if
/// any of them is unmasked.
fn commit_flags(cpu: &mut Core, fl: u32) -> Result<()> {
    let masks = (cpu.s.fpu.mxcsr >> 7) & 0x3f;
    cpu.s.fpu.mxcsr |= fl;
    if fl & !masks & 0x3f != 0 {
        return Err(if cpu.s.cr4 & crate::state::cr::CR4_OSXMMEXCPT != 0 {
            Fault::new(crate::exceptions::vector::XM)
        } else {
            Fault::ud()
        });
    }
    Ok(())
}
