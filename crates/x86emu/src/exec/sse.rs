//! SSE/SSE2: data movement and packed-integer instructions. Floating point lives in
//! `sse_fp.rs`. MMX-register forms are not implemented (#UD).

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{ea, mask, mem_seg, reg_read, reg_write};
use super::sse_fp;
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

#[inline]
pub(crate) fn xmm_index(r: Register) -> Option<usize> {
    if r.is_xmm() {
        Some(r as usize - Register::XMM0 as usize)
    } else {
        None
    }
}

#[inline]
pub(crate) fn get_x(cpu: &Core, r: Register) -> u128 {
    xmm_index(r)
        .and_then(|i| cpu.s.fpu.xmm.get(i).copied())
        .unwrap_or(0)
}

#[inline]
pub(crate) fn set_x(cpu: &mut Core, r: Register, v: u128) {
    if let Some(x) = xmm_index(r).and_then(|i| cpu.s.fpu.xmm.get_mut(i)) {
        *x = v;
    }
}

/// Mnemonics whose 16-byte memory operand may be unaligned.
fn unaligned_ok(m: M) -> bool {
    matches!(m, M::Movups | M::Movupd | M::Movdqu | M::Lddqu)
}

/// Reads operand `i` as a vector: XMM register, or memory zero-extended from its size
/// (16-byte legacy-SSE operands must be aligned unless the instruction says otherwise).
pub(crate) fn src(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction, i: u32) -> Result<u128> {
    match ins.op_kind(i) {
        OpKind::Register => {
            let r = ins.op_register(i);
            if r.is_xmm() {
                Ok(get_x(cpu, r))
            } else if r.is_gpr() {
                Ok(u128::from(reg_read(cpu, r)))
            } else {
                Err(Fault::ud())
            }
        }
        OpKind::Memory => {
            let size = ins.memory_size().size() as u32;
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            if size == 16 {
                if a & 15 != 0 && !unaligned_ok(ins.mnemonic()) {
                    return Err(Fault::gp0());
                }
                cpu.read_mem128(p, seg, a)
            } else {
                Ok(u128::from(cpu.read_mem(p, seg, a, size.min(8))?))
            }
        }
        OpKind::Immediate8 => Ok(u128::from(ins.immediate8())),
        _ => Err(Fault::ud()),
    }
}

/// Writes operand 0: XMM register (whole), or memory of the operand's size.
pub(crate) fn dst_write(
    cpu: &mut Core,
    p: &mut dyn Platform,
    ins: &Instruction,
    v: u128,
) -> Result<()> {
    match ins.op0_kind() {
        OpKind::Register => {
            let r = ins.op0_register();
            if r.is_xmm() {
                set_x(cpu, r, v);
            } else if r.is_gpr() {
                reg_write(cpu, r, v as u64);
            } else {
                return Err(Fault::ud());
            }
            Ok(())
        }
        OpKind::Memory => {
            let size = ins.memory_size().size() as u32;
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            if size == 16 {
                if a & 15 != 0 && !unaligned_ok(ins.mnemonic()) {
                    return Err(Fault::gp0());
                }
                cpu.write_mem128(p, seg, a, v)
            } else {
                cpu.write_mem(p, seg, a, size.min(8), v as u64)
            }
        }
        _ => Err(Fault::ud()),
    }
}

macro_rules! lanes {
    ($name:ident, $back:ident, $t:ty, $n:expr) => {
        #[inline]
        pub(crate) fn $name(v: u128) -> [$t; $n] {
            let b = v.to_le_bytes();
            let mut out = [0 as $t; $n];
            const W: usize = 16 / $n;
            for (i, o) in out.iter_mut().enumerate() {
                let mut e = [0u8; W];
                e.copy_from_slice(&b[i * W..i * W + W]);
                *o = <$t>::from_le_bytes(e);
            }
            out
        }
        #[inline]
        pub(crate) fn $back(a: [$t; $n]) -> u128 {
            let mut b = [0u8; 16];
            const W: usize = 16 / $n;
            for (i, x) in a.iter().enumerate() {
                b[i * W..i * W + W].copy_from_slice(&x.to_le_bytes());
            }
            u128::from_le_bytes(b)
        }
    };
}
lanes!(u8s, from_u8s, u8, 16);
lanes!(u16s, from_u16s, u16, 8);
lanes!(u32s, from_u32s, u32, 4);
lanes!(u64s, from_u64s, u64, 2);

fn map2<const N: usize, T: Copy + Default>(a: [T; N], b: [T; N], f: impl Fn(T, T) -> T) -> [T; N] {
    let mut o = [T::default(); N];
    for i in 0..N {
        o[i] = f(a[i], b[i]);
    }
    o
}

fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}

/// Packed-integer binary operations on (dst, src).
fn int_binop(m: M, a: u128, b: u128) -> Option<u128> {
    Some(match m {
        M::Paddb => from_u8s(map2(u8s(a), u8s(b), |x, y| x.wrapping_add(y))),
        M::Paddw => from_u16s(map2(u16s(a), u16s(b), |x, y| x.wrapping_add(y))),
        M::Paddd => from_u32s(map2(u32s(a), u32s(b), |x, y| x.wrapping_add(y))),
        M::Paddq => from_u64s(map2(u64s(a), u64s(b), |x, y| x.wrapping_add(y))),
        M::Psubb => from_u8s(map2(u8s(a), u8s(b), |x, y| x.wrapping_sub(y))),
        M::Psubw => from_u16s(map2(u16s(a), u16s(b), |x, y| x.wrapping_sub(y))),
        M::Psubd => from_u32s(map2(u32s(a), u32s(b), |x, y| x.wrapping_sub(y))),
        M::Psubq => from_u64s(map2(u64s(a), u64s(b), |x, y| x.wrapping_sub(y))),
        M::Paddsb => from_u8s(map2(u8s(a), u8s(b), |x, y| {
            sat_i8(i32::from(x as i8) + i32::from(y as i8))
        })),
        M::Paddsw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            sat_i16(i32::from(x as i16) + i32::from(y as i16))
        })),
        M::Psubsb => from_u8s(map2(u8s(a), u8s(b), |x, y| {
            sat_i8(i32::from(x as i8) - i32::from(y as i8))
        })),
        M::Psubsw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            sat_i16(i32::from(x as i16) - i32::from(y as i16))
        })),
        M::Paddusb => from_u8s(map2(u8s(a), u8s(b), |x, y| x.saturating_add(y))),
        M::Paddusw => from_u16s(map2(u16s(a), u16s(b), |x, y| x.saturating_add(y))),
        M::Psubusb => from_u8s(map2(u8s(a), u8s(b), |x, y| x.saturating_sub(y))),
        M::Psubusw => from_u16s(map2(u16s(a), u16s(b), |x, y| x.saturating_sub(y))),
        M::Pmullw => from_u16s(map2(u16s(a), u16s(b), |x, y| x.wrapping_mul(y))),
        M::Pmulhw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
        })),
        M::Pmulhuw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            ((u32::from(x) * u32::from(y)) >> 16) as u16
        })),
        M::Pmuludq => {
            let (x, y) = (u64s(a), u64s(b));
            from_u64s([
                (x[0] & 0xffff_ffff) * (y[0] & 0xffff_ffff),
                (x[1] & 0xffff_ffff) * (y[1] & 0xffff_ffff),
            ])
        }
        M::Pmaddwd => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = [0u32; 4];
            for (i, v) in o.iter_mut().enumerate() {
                let p0 = i32::from(x[2 * i] as i16) * i32::from(y[2 * i] as i16);
                let p1 = i32::from(x[2 * i + 1] as i16) * i32::from(y[2 * i + 1] as i16);
                *v = p0.wrapping_add(p1) as u32;
            }
            from_u32s(o)
        }
        M::Pavgb => from_u8s(map2(u8s(a), u8s(b), |x, y| {
            ((u16::from(x) + u16::from(y) + 1) >> 1) as u8
        })),
        M::Pavgw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            ((u32::from(x) + u32::from(y) + 1) >> 1) as u16
        })),
        M::Psadbw => {
            let (x, y) = (u8s(a), u8s(b));
            let s =
                |r: std::ops::Range<usize>| r.map(|i| u64::from(x[i].abs_diff(y[i]))).sum::<u64>();
            from_u64s([s(0..8), s(8..16)])
        }
        M::Pminub => from_u8s(map2(u8s(a), u8s(b), |x, y| x.min(y))),
        M::Pmaxub => from_u8s(map2(u8s(a), u8s(b), |x, y| x.max(y))),
        M::Pminsw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            (x as i16).min(y as i16) as u16
        })),
        M::Pmaxsw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            (x as i16).max(y as i16) as u16
        })),
        M::Pcmpeqb => from_u8s(map2(u8s(a), u8s(b), |x, y| if x == y { 0xff } else { 0 })),
        M::Pcmpeqw => from_u16s(map2(
            u16s(a),
            u16s(b),
            |x, y| if x == y { 0xffff } else { 0 },
        )),
        M::Pcmpeqd => from_u32s(map2(
            u32s(a),
            u32s(b),
            |x, y| if x == y { u32::MAX } else { 0 },
        )),
        M::Pcmpgtb => from_u8s(map2(u8s(a), u8s(b), |x, y| {
            if (x as i8) > (y as i8) {
                0xff
            } else {
                0
            }
        })),
        M::Pcmpgtw => from_u16s(map2(u16s(a), u16s(b), |x, y| {
            if (x as i16) > (y as i16) {
                0xffff
            } else {
                0
            }
        })),
        M::Pcmpgtd => from_u32s(map2(u32s(a), u32s(b), |x, y| {
            if (x as i32) > (y as i32) {
                u32::MAX
            } else {
                0
            }
        })),
        M::Pand => a & b,
        M::Pandn => !a & b,
        M::Por => a | b,
        M::Pxor => a ^ b,
        M::Packsswb => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = [0u8; 16];
            for i in 0..8 {
                o[i] = sat_i8(i32::from(x[i] as i16));
                o[i + 8] = sat_i8(i32::from(y[i] as i16));
            }
            from_u8s(o)
        }
        M::Packuswb => {
            let (x, y) = (u16s(a), u16s(b));
            let mut o = [0u8; 16];
            for i in 0..8 {
                o[i] = sat_u8(i32::from(x[i] as i16));
                o[i + 8] = sat_u8(i32::from(y[i] as i16));
            }
            from_u8s(o)
        }
        M::Packssdw => {
            let (x, y) = (u32s(a), u32s(b));
            let mut o = [0u16; 8];
            for i in 0..4 {
                o[i] = (x[i] as i32).clamp(-32768, 32767) as i16 as u16;
                o[i + 4] = (y[i] as i32).clamp(-32768, 32767) as i16 as u16;
            }
            from_u16s(o)
        }
        M::Punpcklbw | M::Punpckhbw => {
            let (x, y) = (u8s(a), u8s(b));
            let off = if m == M::Punpckhbw { 8 } else { 0 };
            let mut o = [0u8; 16];
            for i in 0..8 {
                o[2 * i] = x[off + i];
                o[2 * i + 1] = y[off + i];
            }
            from_u8s(o)
        }
        M::Punpcklwd | M::Punpckhwd => {
            let (x, y) = (u16s(a), u16s(b));
            let off = if m == M::Punpckhwd { 4 } else { 0 };
            let mut o = [0u16; 8];
            for i in 0..4 {
                o[2 * i] = x[off + i];
                o[2 * i + 1] = y[off + i];
            }
            from_u16s(o)
        }
        M::Punpckldq | M::Punpckhdq | M::Unpcklps | M::Unpckhps => {
            let (x, y) = (u32s(a), u32s(b));
            let off = if matches!(m, M::Punpckhdq | M::Unpckhps) {
                2
            } else {
                0
            };
            from_u32s([x[off], y[off], x[off + 1], y[off + 1]])
        }
        M::Punpcklqdq | M::Unpcklpd => from_u64s([u64s(a)[0], u64s(b)[0]]),
        M::Punpckhqdq | M::Unpckhpd => from_u64s([u64s(a)[1], u64s(b)[1]]),
        M::Andps | M::Andpd => a & b,
        M::Andnps | M::Andnpd => !a & b,
        M::Orps | M::Orpd => a | b,
        M::Xorps | M::Xorpd => a ^ b,
        _ => return None,
    })
}

/// Shift by a count (from imm8 or the low 64 bits of an XMM/m128 operand).
fn shift(m: M, a: u128, count: u64) -> Option<u128> {
    let c = count;
    Some(match m {
        M::Psllw => from_u16s(u16s(a).map(|x| if c > 15 { 0 } else { x << c })),
        M::Pslld => from_u32s(u32s(a).map(|x| if c > 31 { 0 } else { x << c })),
        M::Psllq => from_u64s(u64s(a).map(|x| if c > 63 { 0 } else { x << c })),
        M::Psrlw => from_u16s(u16s(a).map(|x| if c > 15 { 0 } else { x >> c })),
        M::Psrld => from_u32s(u32s(a).map(|x| if c > 31 { 0 } else { x >> c })),
        M::Psrlq => from_u64s(u64s(a).map(|x| if c > 63 { 0 } else { x >> c })),
        M::Psraw => from_u16s(u16s(a).map(|x| ((x as i16) >> c.min(15)) as u16)),
        M::Psrad => from_u32s(u32s(a).map(|x| ((x as i32) >> c.min(31)) as u32)),
        M::Pslldq => {
            if c > 15 {
                0
            } else {
                a << (c * 8)
            }
        }
        M::Psrldq => {
            if c > 15 {
                0
            } else {
                a >> (c * 8)
            }
        }
        _ => return None,
    })
}

fn is_mmx(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Register && ins.op_register(i).is_mm())
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    if is_mmx(ins) {
        return super::hostexec::exec(cpu, p, ins);
    }
    match m {
        M::Movdqa
        | M::Movdqu
        | M::Movaps
        | M::Movups
        | M::Movapd
        | M::Movupd
        | M::Lddqu
        | M::Movntdq
        | M::Movntps
        | M::Movntpd => {
            cpu.sse_check()?;
            let v = src(cpu, p, ins, 1)?;
            dst_write(cpu, p, ins, v)
        }
        M::Movnti => {
            let v = cpu.read_op(p, ins, 1)?;
            cpu.write_op(p, ins, 0, v)
        }
        M::Movd | M::Movq => {
            cpu.sse_check()?;
            let v = src(cpu, p, ins, 1)?;
            let size = if ins.op1_kind() == OpKind::Register && ins.op1_register().is_gpr() {
                reg_size_of(ins.op1_register())
            } else if ins.op1_kind() == OpKind::Memory {
                ins.memory_size().size() as u32
            } else if m == M::Movd {
                4
            } else {
                8
            };
            // Loads into XMM zero the rest; stores write the low part.
            dst_write(cpu, p, ins, v & u128::from(mask(size)))
        }
        M::Movss | M::Movsd => {
            cpu.sse_check()?;
            let w: u128 = if m == M::Movss {
                0xffff_ffff
            } else {
                u128::from(u64::MAX)
            };
            let v = src(cpu, p, ins, 1)?;
            if ins.op0_kind() == OpKind::Register && ins.op1_kind() == OpKind::Register {
                let d = get_x(cpu, ins.op0_register());
                set_x(cpu, ins.op0_register(), (d & !w) | (v & w));
                Ok(())
            } else {
                dst_write(cpu, p, ins, v & w)
            }
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
            cpu.sse_check()?;
            let high = matches!(m, M::Movhps | M::Movhpd);
            if ins.op0_kind() == OpKind::Memory {
                let v = get_x(cpu, ins.op1_register());
                let part = if high {
                    v >> 64
                } else {
                    v & u128::from(u64::MAX)
                };
                dst_write(cpu, p, ins, part)
            } else {
                let v = src(cpu, p, ins, 1)? & u128::from(u64::MAX);
                let d = get_x(cpu, ins.op0_register());
                let r = if high {
                    (d & u128::from(u64::MAX)) | (v << 64)
                } else {
                    (d & !u128::from(u64::MAX)) | v
                };
                set_x(cpu, ins.op0_register(), r);
                Ok(())
            }
        }
        M::Movhlps | M::Movlhps => {
            cpu.sse_check()?;
            let d = get_x(cpu, ins.op0_register());
            let s = get_x(cpu, ins.op1_register());
            let lo = u128::from(u64::MAX);
            let r = if m == M::Movhlps {
                (d & !lo) | (s >> 64)
            } else {
                (d & lo) | (s << 64)
            };
            set_x(cpu, ins.op0_register(), r);
            Ok(())
        }
        M::Movmskps | M::Movmskpd | M::Pmovmskb => {
            cpu.sse_check()?;
            let v = get_x(cpu, ins.op1_register());
            let r = match m {
                M::Movmskps => u32s(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (i, x)| a | (u64::from(x >> 31) << i)),
                M::Movmskpd => u64s(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (i, x)| a | ((x >> 63) << i)),
                _ => u8s(v)
                    .iter()
                    .enumerate()
                    .fold(0u64, |a, (i, x)| a | (u64::from(x >> 7) << i)),
            };
            reg_write(cpu, ins.op0_register(), r);
            Ok(())
        }
        M::Pshufd | M::Pshuflw | M::Pshufhw => {
            cpu.sse_check()?;
            let v = src(cpu, p, ins, 1)?;
            let imm = ins.immediate8();
            let sel = |k: u8| usize::from((imm >> (2 * k)) & 3);
            let r = match m {
                M::Pshufd => {
                    let d = u32s(v);
                    from_u32s([d[sel(0)], d[sel(1)], d[sel(2)], d[sel(3)]])
                }
                M::Pshuflw => {
                    let mut w = u16s(v);
                    let lo = [w[0], w[1], w[2], w[3]];
                    for k in 0..4 {
                        w[k] = lo[sel(k as u8)];
                    }
                    from_u16s(w)
                }
                _ => {
                    let mut w = u16s(v);
                    let hi = [w[4], w[5], w[6], w[7]];
                    for k in 0..4 {
                        w[4 + k] = hi[sel(k as u8)];
                    }
                    from_u16s(w)
                }
            };
            set_x(cpu, ins.op0_register(), r);
            Ok(())
        }
        M::Shufps | M::Shufpd => {
            cpu.sse_check()?;
            let a = get_x(cpu, ins.op0_register());
            let b = src(cpu, p, ins, 1)?;
            let imm = ins.immediate8();
            let r = if m == M::Shufps {
                let (x, y) = (u32s(a), u32s(b));
                let s = |k: u8| usize::from((imm >> (2 * k)) & 3);
                from_u32s([x[s(0)], x[s(1)], y[s(2)], y[s(3)]])
            } else {
                let (x, y) = (u64s(a), u64s(b));
                from_u64s([x[usize::from(imm & 1)], y[usize::from((imm >> 1) & 1)]])
            };
            set_x(cpu, ins.op0_register(), r);
            Ok(())
        }
        M::Pextrw => {
            cpu.sse_check()?;
            let v = get_x(cpu, ins.op1_register());
            let w = u16s(v)[usize::from(ins.immediate8() & 7)];
            cpu.write_op(p, ins, 0, u64::from(w))
        }
        M::Pinsrw => {
            cpu.sse_check()?;
            let v = cpu.read_op(p, ins, 1)? as u16;
            let mut w = u16s(get_x(cpu, ins.op0_register()));
            w[usize::from(ins.immediate8() & 7)] = v;
            set_x(cpu, ins.op0_register(), from_u16s(w));
            Ok(())
        }
        M::Psllw
        | M::Pslld
        | M::Psllq
        | M::Psrlw
        | M::Psrld
        | M::Psrlq
        | M::Psraw
        | M::Psrad
        | M::Pslldq
        | M::Psrldq => {
            cpu.sse_check()?;
            let count = if ins.op1_kind() == OpKind::Immediate8 {
                u64::from(ins.immediate8())
            } else {
                src(cpu, p, ins, 1)? as u64
            };
            let a = get_x(cpu, ins.op0_register());
            let r = shift(m, a, count).ok_or(Fault::ud())?;
            set_x(cpu, ins.op0_register(), r);
            Ok(())
        }
        _ => {
            if int_binop(m, 0, 0).is_some() {
                cpu.sse_check()?;
                let a = get_x(cpu, ins.op0_register());
                let b = src(cpu, p, ins, 1)?;
                let v = int_binop(m, a, b).ok_or(Fault::ud())?;
                set_x(cpu, ins.op0_register(), v);
                return Ok(());
            }
            sse_fp::exec(cpu, p, ins)
        }
    }
}

fn reg_size_of(r: Register) -> u32 {
    super::operand::reg_size(r)
}
