//! F and D: IEEE 754 binary32/binary64 through rustc_apfloat (Rust's port of LLVM's
//! APFloat), which gives every rounding mode and the exception flags exactly; square root
//! (which APFloat lacks) comes from the host, corrected for the rounding mode with its
//! residual. Results that are NaN are canonical, as RISC-V requires; single values live
//! NaN-boxed in the 64-bit registers.

use crate::bus::Bus;
use crate::cpu::{Cpu, Flow};
use crate::csr::status;
use crate::decode::{Insn, Op};
use crate::trap::Exception;
use rustc_apfloat::ieee::{Double, Quad, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

const CANON_S: u64 = 0x7fc0_0000;
const CANON_D: u64 = 0x7ff8_0000_0000_0000;
const BOX: u64 = 0xffff_ffff_0000_0000;

/// fflags bits.
const NV: u64 = 0x10;
const DZ: u64 = 0x08;
const OF: u64 = 0x04;
const UF: u64 = 0x02;
const NX: u64 = 0x01;

fn flags_of(s: Status) -> u64 {
    let mut f = 0;
    if s.contains(Status::INVALID_OP) {
        f |= NV;
    }
    if s.contains(Status::DIV_BY_ZERO) {
        f |= DZ;
    }
    if s.contains(Status::OVERFLOW) {
        f |= OF;
    }
    if s.contains(Status::UNDERFLOW) {
        f |= UF;
    }
    if s.contains(Status::INEXACT) {
        f |= NX;
    }
    f
}

/// One of the two formats, with what differs between them.
trait Fmt: Float + FloatConvert<Single> + FloatConvert<Double> + FloatConvert<Quad> + Copy {
    const CANON: u64;
    const WIDTH: u32;
    fn unbox(reg: u64) -> Self;
    fn boxed(self) -> u64;
    fn host_sqrt(self) -> (Self, Status);
}

impl Fmt for Single {
    const CANON: u64 = CANON_S;
    const WIDTH: u32 = 32;
    fn unbox(reg: u64) -> Self {
        if reg & BOX != BOX {
            return Single::from_bits(CANON_S as u128);
        }
        Single::from_bits((reg & 0xffff_ffff) as u128)
    }
    fn boxed(self) -> u64 {
        if self.is_nan() {
            return BOX | CANON_S;
        }
        BOX | self.to_bits() as u64
    }
    fn host_sqrt(self) -> (Self, Status) {
        // The binary64 root of a binary32 value is exact or at least 29 bits finer than
        // binary32; rounding it once more to binary32 is correct except when that root
        // lands exactly on a binary32 value while the true root does not, which the
        // residual sign below settles.
        let x = f32::from_bits(self.to_bits() as u32) as f64;
        let (r, st) = sqrt64(x, Round::NearestTiesToEven);
        let mut loses = false;
        let d = Double::from_bits(r.to_bits() as u128);
        let StatusAnd { value, status } = d.convert_r(Round::NearestTiesToEven, &mut loses);
        (value, st | status)
    }
}

impl Fmt for Double {
    const CANON: u64 = CANON_D;
    const WIDTH: u32 = 64;
    fn unbox(reg: u64) -> Self {
        Double::from_bits(reg as u128)
    }
    fn boxed(self) -> u64 {
        if self.is_nan() {
            return CANON_D;
        }
        self.to_bits() as u64
    }
    fn host_sqrt(self) -> (Self, Status) {
        let (r, st) = sqrt64(
            f64::from_bits(self.to_bits() as u64),
            Round::NearestTiesToEven,
        );
        (Double::from_bits(r.to_bits() as u128), st)
    }
}

/// A binary64 square root rounded as `round` asks, with its flags.
fn sqrt64(x: f64, round: Round) -> (f64, Status) {
    if x.is_nan() {
        let snan = x.to_bits() & (1 << 51) == 0;
        return (
            f64::from_bits(CANON_D),
            if snan { Status::INVALID_OP } else { Status::OK },
        );
    }
    if x < 0.0 {
        return (f64::from_bits(CANON_D), Status::INVALID_OP);
    }
    if x == 0.0 || x.is_infinite() {
        return (x, Status::OK);
    }
    // Tiny inputs are scaled by an even power of two first, so the residual below does
    // not vanish into the subnormal range; the root scales back exactly.
    let tiny = x < f64::from_bits(0x0830_0000_0000_0000); // 2^-892
    let (x, back) = if tiny {
        (x * f64::from_bits(0x4c70_0000_0000_0000), 100) // × 2^200
    } else {
        (x, 0)
    };
    let r = x.sqrt();
    // r*r - x, with one rounding: its sign says which side of the true root r is.
    let residual = r.mul_add(r, -x);
    let unscale = |v: f64| {
        if back == 0 {
            v
        } else {
            v * f64::from_bits(0x39b0_0000_0000_0000) // × 2^-100
        }
    };
    if residual == 0.0 {
        return (unscale(r), Status::OK);
    }
    let above = residual > 0.0;
    let r = match round {
        Round::TowardZero | Round::TowardNegative if above => f64::from_bits(r.to_bits() - 1),
        Round::TowardPositive if !above => f64::from_bits(r.to_bits() + 1),
        _ => r,
    };
    (unscale(r), Status::INEXACT)
}

/// APFloat (as LLVM's) reports a result rounded toward zero to the largest finite value
/// as merely inexact; IEEE 754 calls it an overflow when the value, rounded with an
/// unbounded exponent, is beyond that. `exact` recomputes the operation in binary128
/// (wide enough never to overflow here) toward zero to tell the two apart.
fn with_overflow<F: Fmt>(r: StatusAnd<F>, exact: impl FnOnce() -> Quad) -> StatusAnd<F> {
    let StatusAnd { value, mut status } = r;
    if status.contains(Status::INEXACT)
        && !status.contains(Status::OVERFLOW)
        && value.abs().bitwise_eq(F::largest())
    {
        // 2^(emax+1): the largest finite value plus one of its ulps, exact in binary128.
        let largest = quad(F::largest());
        let below = quad(F::largest().next_down().value);
        let limit = (largest + (largest - below).value).value;
        if exact().abs() >= limit {
            status |= Status::OVERFLOW;
        }
    }
    StatusAnd { value, status }
}

fn quad<F: Fmt>(x: F) -> Quad {
    let mut loses = false;
    x.convert(&mut loses).value
}

fn is_snan<F: Float>(x: F) -> bool {
    x.is_signaling()
}

fn class<F: Float>(x: F) -> u64 {
    let neg = x.is_negative();
    let bit = if x.is_nan() {
        if x.is_signaling() {
            8
        } else {
            9
        }
    } else if x.is_infinite() {
        if neg {
            0
        } else {
            7
        }
    } else if x.is_zero() {
        if neg {
            3
        } else {
            4
        }
    } else if x.is_denormal() {
        if neg {
            2
        } else {
            5
        }
    } else if neg {
        1
    } else {
        6
    };
    1 << bit
}

/// Float to integer, saturating with NV as RISC-V specifies.
fn to_int<F: Fmt>(x: F, round: Round, signed: bool, width: u32) -> (u64, u64) {
    let (min, max): (i128, i128) = if signed {
        (-(1i128 << (width - 1)), (1i128 << (width - 1)) - 1)
    } else {
        (0, (1i128 << width) - 1)
    };
    let ext = |v: i128| -> u64 {
        if width == 32 {
            v as u64 as u32 as i32 as i64 as u64
        } else {
            v as u64
        }
    };
    if x.is_nan() {
        return (ext(max), NV);
    }
    let StatusAnd { value: r, status } = x.round_to_integral(round);
    if r.is_infinite() {
        return (ext(if r.is_negative() { min } else { max }), NV);
    }
    let mut exact = true;
    // Integral and finite: any value fits in i128 range checks below after clamping.
    let v = r.to_i128_r(128, Round::TowardZero, &mut exact);
    let v = v.value;
    if v < min {
        return (ext(min), NV);
    }
    if v > max {
        return (ext(max), NV);
    }
    (ext(v), flags_of(status) & NX)
}

impl Cpu {
    fn rounding(&self, rm: u8, i: &Insn) -> Result<Round, Exception> {
        let rm = if rm == 7 { self.csr.frm as u8 } else { rm };
        Ok(match rm {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardZero,
            2 => Round::TowardNegative,
            3 => Round::TowardPositive,
            4 => Round::NearestTiesToAway,
            _ => return Err(Exception::IllegalInstruction(i.raw as u64)),
        })
    }

    fn fset(&mut self, rd: u8, v: u64) {
        self.f[rd as usize & 31] = v;
        self.csr.mstatus |= status::FS;
    }

    fn fflag(&mut self, f: u64) {
        if f != 0 {
            self.csr.fflags |= f;
            self.csr.mstatus |= status::FS;
        }
    }

    fn xset(&mut self, rd: u8, v: u64) {
        if rd != 0 {
            self.x[rd as usize & 31] = v;
        }
    }

    pub(crate) fn exec_fp(&mut self, i: &Insn, bus: &mut dyn Bus) -> Result<Flow, Exception> {
        if self.csr.mstatus & status::FS == 0 {
            return Err(Exception::IllegalInstruction(i.raw as u64));
        }
        match i.op {
            Op::FLoad => {
                let addr = self.x[i.rs1 as usize & 31].wrapping_add(i.imm as u64);
                let v = self.load(bus, addr, i.funct)?;
                self.fset(i.rd, if i.funct == 4 { BOX | v } else { v });
            }
            Op::FStore => {
                let addr = self.x[i.rs1 as usize & 31].wrapping_add(i.imm as u64);
                let v = self.f[i.rs2 as usize & 31];
                self.store(bus, addr, i.funct, v)?;
            }
            Op::FFused => {
                let fmt = (i.imm >> 3) & 3;
                let round = self.rounding((i.imm & 7) as u8, i)?;
                if fmt == 0 {
                    self.fused::<Single>(i, round);
                } else {
                    self.fused::<Double>(i, round);
                }
            }
            _ => {
                if i.funct & 1 == 0 {
                    self.fop::<Single>(i)?;
                } else {
                    self.fop::<Double>(i)?;
                }
            }
        }
        Ok(Flow::Next)
    }

    fn fused<F: Fmt>(&mut self, i: &Insn, round: Round) {
        let a = F::unbox(self.f[i.rs1 as usize & 31]);
        let b = F::unbox(self.f[i.rs2 as usize & 31]);
        let c = F::unbox(self.f[i.rs3 as usize & 31]);
        // inf × 0 is invalid even when the addend is a quiet NaN.
        let inf_zero = (a.is_infinite() && b.is_zero()) || (a.is_zero() && b.is_infinite());
        let (a, c) = match i.funct {
            0 => (a, c),
            1 => (a, -c),
            2 => (-a, c),
            _ => (-a, -c),
        };
        let r = a.mul_add_r(b, c, round);
        let StatusAnd { value, mut status } = with_overflow(r, || {
            quad(a).mul_add_r(quad(b), quad(c), Round::TowardZero).value
        });
        if inf_zero {
            status |= Status::INVALID_OP;
        }
        let v = value.boxed();
        self.fflag(flags_of(status));
        self.fset(i.rd, v);
    }

    fn fop<F: Fmt>(&mut self, i: &Insn) -> Result<(), Exception> {
        let rm = (i.imm & 7) as u8;
        let rs2f = (i.imm >> 3) as u8;
        let ra = self.f[i.rs1 as usize & 31];
        let a = F::unbox(ra);
        let b = F::unbox(self.f[i.rs2 as usize & 31]);
        let ill = Exception::IllegalInstruction(i.raw as u64);
        match i.funct >> 2 {
            // fadd, fsub, fmul, fdiv
            0..=3 => {
                let round = self.rounding(rm, i)?;
                let op = i.funct >> 2;
                let r = match op {
                    0 => a.add_r(b, round),
                    1 => a.sub_r(b, round),
                    2 => a.mul_r(b, round),
                    _ => a.div_r(b, round),
                };
                let StatusAnd { value, status } = with_overflow(r, || {
                    let (x, y) = (quad(a), quad(b));
                    let t = Round::TowardZero;
                    match op {
                        0 => x.add_r(y, t).value,
                        1 => x.sub_r(y, t).value,
                        2 => x.mul_r(y, t).value,
                        _ => x.div_r(y, t).value,
                    }
                });
                self.fflag(flags_of(status));
                self.fset(i.rd, value.boxed());
            }
            // fsqrt
            0x0b => {
                if rs2f != 0 {
                    return Err(ill);
                }
                let round = self.rounding(rm, i)?;
                let (v, st) = if F::WIDTH == 64 {
                    let (r, st) = sqrt64(f64::from_bits(a.to_bits() as u64), round);
                    (r.to_bits(), st)
                } else if round == Round::NearestTiesToEven || round == Round::NearestTiesToAway {
                    let (r, st) = a.host_sqrt();
                    (r.boxed(), st)
                } else {
                    // Directed binary32 roots: from the exact-or-finer binary64 root.
                    let x = f32::from_bits(a.to_bits() as u32) as f64;
                    let (r64, st64) = sqrt64(x, Round::TowardZero);
                    let mut loses = false;
                    let d = Double::from_bits(r64.to_bits() as u128);
                    let StatusAnd { value, status }: StatusAnd<Single> =
                        d.convert_r(round, &mut loses);
                    // A truncated binary64 root that is itself a binary32 value while the
                    // true root is above it: rounding up must still go up.
                    let mut value = value;
                    if st64.contains(Status::INEXACT) && !loses && round == Round::TowardPositive {
                        value = value.next_up().value;
                    }
                    (value.boxed(), st64 | status)
                };
                let v = if f64::from_bits(v).is_nan() && F::WIDTH == 64 {
                    CANON_D
                } else {
                    v
                };
                self.fflag(flags_of(st));
                self.fset(i.rd, v);
            }
            // fsgnj, fsgnjn, fsgnjx: sign bit games on the raw (unboxed) value.
            0x04 => {
                let sign = 1u128 << (F::WIDTH - 1);
                let (ab, bb) = (a.to_bits(), b.to_bits());
                let s = match rm {
                    0 => bb & sign,
                    1 => !bb & sign,
                    2 => (ab ^ bb) & sign,
                    _ => return Err(ill),
                };
                let v = (ab & !sign) | s;
                let out = if F::WIDTH == 32 {
                    BOX | v as u64
                } else {
                    v as u64
                };
                self.fset(i.rd, out);
            }
            // fmin, fmax
            0x05 => {
                if rm > 1 {
                    return Err(ill);
                }
                let mut fl = 0;
                if is_snan(a) || is_snan(b) {
                    fl |= NV;
                }
                let v = match (a.is_nan(), b.is_nan()) {
                    (true, true) => F::CANON | if F::WIDTH == 32 { BOX } else { 0 },
                    (true, false) => b.boxed(),
                    (false, true) => a.boxed(),
                    _ => {
                        let pick_a = if a.is_zero() && b.is_zero() {
                            // -0 is the smaller zero.
                            (rm == 0) == a.is_negative()
                        } else if rm == 0 {
                            a < b
                        } else {
                            a > b
                        };
                        if pick_a {
                            a.boxed()
                        } else {
                            b.boxed()
                        }
                    }
                };
                self.fflag(fl);
                self.fset(i.rd, v);
            }
            // fcvt.s.d / fcvt.d.s
            0x08 => {
                let round = self.rounding(rm, i)?;
                let mut loses = false;
                if F::WIDTH == 32 {
                    if rs2f != 1 {
                        return Err(ill);
                    }
                    let d = Double::unbox(self.f[i.rs1 as usize & 31]);
                    let r: StatusAnd<Single> = d.convert_r(round, &mut loses);
                    let StatusAnd { value, status } = with_overflow(r, || quad(d));
                    let st = if d.is_nan() {
                        if d.is_signaling() {
                            Status::INVALID_OP
                        } else {
                            Status::OK
                        }
                    } else {
                        status
                    };
                    self.fflag(flags_of(st));
                    self.fset(i.rd, value.boxed());
                } else {
                    if rs2f != 0 {
                        return Err(ill);
                    }
                    let s = Single::unbox(self.f[i.rs1 as usize & 31]);
                    let StatusAnd { value, status }: StatusAnd<Double> =
                        s.convert_r(round, &mut loses);
                    let st = if s.is_nan() {
                        if s.is_signaling() {
                            Status::INVALID_OP
                        } else {
                            Status::OK
                        }
                    } else {
                        status
                    };
                    self.fflag(flags_of(st));
                    self.fset(i.rd, value.boxed());
                }
            }
            // feq, flt, fle
            0x14 => {
                let any_nan = a.is_nan() || b.is_nan();
                let (v, fl) = match rm {
                    2 => (
                        !any_nan && a == b,
                        if is_snan(a) || is_snan(b) { NV } else { 0 },
                    ),
                    1 => (!any_nan && a < b, if any_nan { NV } else { 0 }),
                    0 => (!any_nan && a <= b, if any_nan { NV } else { 0 }),
                    _ => return Err(ill),
                };
                self.fflag(fl);
                self.xset(i.rd, v as u64);
            }
            // fcvt.{w,wu,l,lu}.{s,d}
            0x18 => {
                let round = self.rounding(rm, i)?;
                let (signed, width) = match rs2f {
                    0 => (true, 32),
                    1 => (false, 32),
                    2 => (true, 64),
                    3 => (false, 64),
                    _ => return Err(ill),
                };
                let (v, fl) = to_int(a, round, signed, width);
                self.fflag(fl);
                self.xset(i.rd, v);
            }
            // fcvt.{s,d}.{w,wu,l,lu}
            0x1a => {
                let round = self.rounding(rm, i)?;
                let x = self.x[i.rs1 as usize & 31];
                let StatusAnd { value, status } = match rs2f {
                    0 => F::from_i128_r(x as i32 as i128, round),
                    1 => F::from_u128_r(x as u32 as u128, round),
                    2 => F::from_i128_r(x as i64 as i128, round),
                    3 => F::from_u128_r(x as u128, round),
                    _ => return Err(ill),
                };
                self.fflag(flags_of(status));
                self.fset(i.rd, value.boxed());
            }
            // fmv.x.{w,d}, fclass
            0x1c => {
                if rs2f != 0 {
                    return Err(ill);
                }
                let v = match rm {
                    0 => {
                        if F::WIDTH == 32 {
                            ra as u32 as i32 as i64 as u64
                        } else {
                            ra
                        }
                    }
                    1 => class(a),
                    _ => return Err(ill),
                };
                self.xset(i.rd, v);
            }
            // fmv.{w,d}.x
            0x1e => {
                if rs2f != 0 || rm != 0 {
                    return Err(ill);
                }
                let x = self.x[i.rs1 as usize & 31];
                self.fset(
                    i.rd,
                    if F::WIDTH == 32 {
                        BOX | (x & 0xffff_ffff)
                    } else {
                        x
                    },
                );
            }
            _ => return Err(ill),
        }
        Ok(())
    }
}
