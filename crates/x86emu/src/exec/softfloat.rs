//! Software IEEE-754 arithmetic with x86 SSE semantics: MXCSR rounding control, FTZ,
//! x86 NaN propagation and default NaN, and exact exception flags (IE/DE/ZE/OE/UE/PE)
//! derived from exact error terms (Fast2Sum, FMA residuals with scaling for tiny values)
//! rather than from whatever the host FPU happens to do.

use super::operand::mask;

pub(crate) const IE: u32 = 1 << 0;
pub(crate) const DE: u32 = 1 << 1;
pub(crate) const ZE: u32 = 1 << 2;
pub(crate) const OE: u32 = 1 << 3;
pub(crate) const UE: u32 = 1 << 4;
pub(crate) const PE: u32 = 1 << 5;
pub(crate) const FTZ: u32 = 1 << 15;

pub(crate) trait Fp:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const FRAC: u32;
    const TOTAL: u32;
    fn bits(self) -> u64;
    fn from_bits_u(b: u64) -> Self;
    fn sqrt_(self) -> Self;
    fn zero() -> Self;
    fn half() -> Self;
    /// 2^emax: half of the overflow threshold MAX + ulp.
    fn pow2_emax() -> Self;
    /// Sign of (a*b - r) for r = round(a*b), exact even when r is tiny.
    fn err_mul(a: Self, b: Self, r: Self) -> i32;
    /// Sign of (a/b - r).
    fn err_div(a: Self, b: Self, r: Self) -> i32;
    /// Sign of (sqrt(a) - r).
    fn err_sqrt(a: Self, r: Self) -> i32;
    fn max_finite() -> Self;
    fn is_nan_(self) -> bool {
        let b = self.bits();
        let exp_mask = ((1u64 << (Self::TOTAL - 1 - Self::FRAC)) - 1) << Self::FRAC;
        b & exp_mask == exp_mask && b & ((1u64 << Self::FRAC) - 1) != 0
    }
    fn is_inf_(self) -> bool {
        let b = self.bits() & !(1u64 << (Self::TOTAL - 1));
        b == ((1u64 << (Self::TOTAL - 1 - Self::FRAC)) - 1) << Self::FRAC
    }
    fn is_snan(self) -> bool {
        self.is_nan_() && self.bits() & (1u64 << (Self::FRAC - 1)) == 0
    }
    fn quiet(self) -> Self {
        Self::from_bits_u(self.bits() | (1u64 << (Self::FRAC - 1)))
    }
    fn is_denormal(self) -> bool {
        let b = self.bits();
        let exp_mask = ((1u64 << (Self::TOTAL - 1 - Self::FRAC)) - 1) << Self::FRAC;
        b & exp_mask == 0 && b & ((1u64 << Self::FRAC) - 1) != 0
    }
    fn sign(self) -> bool {
        self.bits() >> (Self::TOTAL - 1) != 0
    }
    /// The x86 "real indefinite" QNaN.
    fn default_nan() -> Self {
        let exp_mask = ((1u64 << (Self::TOTAL - 1 - Self::FRAC)) - 1) << Self::FRAC;
        Self::from_bits_u((1u64 << (Self::TOTAL - 1)) | exp_mask | (1u64 << (Self::FRAC - 1)))
    }
    fn inf(neg: bool) -> Self {
        let exp_mask = ((1u64 << (Self::TOTAL - 1 - Self::FRAC)) - 1) << Self::FRAC;
        Self::from_bits_u(exp_mask | if neg { 1u64 << (Self::TOTAL - 1) } else { 0 })
    }
    fn is_zero(self) -> bool {
        self.bits() & !(1u64 << (Self::TOTAL - 1)) == 0
    }
    fn next_up(self) -> Self {
        if self.is_nan_() || (self.is_inf_() && !self.sign()) {
            return self;
        }
        if self.is_zero() {
            return Self::from_bits_u(1);
        }
        if self.sign() {
            Self::from_bits_u(self.bits() - 1)
        } else {
            Self::from_bits_u(self.bits() + 1)
        }
    }
    fn next_down(self) -> Self {
        -((-self).next_up())
    }
}

pub(crate) fn sgn(x: f64) -> i32 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// Scaling that lifts tiny f64 operands out of the range where FMA residuals underflow.
const UP: f64 = 1.157_920_892_373_162e77; // 2^256

pub(crate) fn err_mul_f64(a: f64, b: f64, r: f64) -> i32 {
    if r == 0.0 && a != 0.0 && b != 0.0 {
        // Underflowed to zero: the error is the whole (nonzero) product.
        return sgn(a) * sgn(b);
    }
    // Lift the smaller operand (and r) so the FMA residual cannot underflow.
    let tiny = a.abs() < 1e-200 || b.abs() < 1e-200 || r.abs() < 1e-250;
    if tiny && r.abs() < 1e200 {
        let (small, big) = if a.abs() < b.abs() { (a, b) } else { (b, a) };
        sgn((small * UP).mul_add(big, -(r * UP)))
    } else {
        sgn(a.mul_add(b, -r))
    }
}

pub(crate) fn err_div_f64(a: f64, b: f64, r: f64) -> i32 {
    if r == 0.0 && a != 0.0 {
        return sgn(a) * sgn(b);
    }
    let (mut a, mut b) = (a, b);
    if a.abs() < 1e-200 && (b * UP).is_finite() {
        // Same ratio, dividend out of the subnormal range.
        a *= UP;
        b *= UP;
    }
    let rem = if r.abs() < 1e-250 {
        (-(r * UP)).mul_add(b, a * UP)
    } else {
        (-r).mul_add(b, a)
    };
    sgn(rem) * if b < 0.0 { -1 } else { 1 }
}

pub(crate) fn err_sqrt_f64(a: f64, r: f64) -> i32 {
    if a < 1e-250 {
        // sqrt(a * 2^512) = sqrt(a) * 2^256, both scalings exact.
        sgn((-(r * UP)).mul_add(r * UP, a * UP * UP))
    } else {
        sgn((-r).mul_add(r, a))
    }
}

macro_rules! impl_fp {
    ($t:ty, $u:ty, $frac:expr, $total:expr, $mul:expr, $div:expr, $sqrt:expr) => {
        impl Fp for $t {
            fn err_mul(a: Self, b: Self, r: Self) -> i32 {
                $mul(a, b, r)
            }
            fn err_div(a: Self, b: Self, r: Self) -> i32 {
                $div(a, b, r)
            }
            fn err_sqrt(a: Self, r: Self) -> i32 {
                $sqrt(a, r)
            }
            const FRAC: u32 = $frac;
            const TOTAL: u32 = $total;
            fn bits(self) -> u64 {
                u64::from(self.to_bits())
            }
            fn from_bits_u(b: u64) -> Self {
                <$t>::from_bits(b as $u)
            }
            fn sqrt_(self) -> Self {
                self.sqrt()
            }
            fn zero() -> Self {
                0.0
            }
            fn half() -> Self {
                0.5
            }
            fn pow2_emax() -> Self {
                // Biased exponent all ones minus one, zero fraction.
                <$t>::from_bits(((1 << (Self::TOTAL - 1 - Self::FRAC)) - 2) << Self::FRAC)
            }
            fn max_finite() -> Self {
                <$t>::MAX
            }
        }
    };
}
// f32 residuals are computed exactly in f64 (products of 24-bit mantissas fit in 53 bits).
impl_fp!(
    f32,
    u32,
    23,
    32,
    |a: f32, b: f32, r: f32| sgn(f64::from(a) * f64::from(b) - f64::from(r)),
    |a: f32, b: f32, r: f32| sgn((-f64::from(r)).mul_add(f64::from(b), f64::from(a)))
        * if b < 0.0 { -1 } else { 1 },
    |a: f32, r: f32| sgn((-f64::from(r)).mul_add(f64::from(r), f64::from(a)))
);
impl_fp!(f64, u64, 52, 64, err_mul_f64, err_div_f64, err_sqrt_f64);

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// Rounds the round-to-nearest result `r` per MXCSR.RC given the sign of the exact error
/// (true value - r), and derives the overflow/underflow/precision flags.
pub(crate) fn finish<F: Fp>(mut r: F, err_sign: i32, mxcsr: u32, finite_inputs: bool) -> (F, u32) {
    let mut fl = 0;
    let rc = (mxcsr >> 13) & 3;
    let overflowed_rn = r.is_inf_() && finite_inputs;
    if overflowed_rn {
        fl |= OE | PE;
        let neg = r.sign();
        r = match (rc, neg) {
            (0, _) => r,
            (1, false) | (3, _) | (2, true) => {
                if neg {
                    -F::max_finite()
                } else {
                    F::max_finite()
                }
            }
            _ => r,
        };
        return (r, fl);
    }
    if err_sign != 0 {
        fl |= PE;
        match rc {
            1 if err_sign < 0 => r = r.next_down(),
            2 if err_sign > 0 => r = r.next_up(),
            3 if (!r.sign() && err_sign < 0) || (r.sign() && err_sign > 0) => {
                r = if r.sign() { r.next_up() } else { r.next_down() }
            }
            _ => {}
        }
        if r.is_inf_() && finite_inputs {
            fl |= OE;
        }
    }
    // Tiny results: underflow is reported when inexact, or always when FTZ flushes them.
    let tiny = r.is_denormal() || (r.is_zero() && err_sign != 0);
    if tiny {
        if mxcsr & FTZ != 0 {
            r = if r.sign() { -F::zero() } else { F::zero() };
            fl |= UE | PE;
        } else if err_sign != 0 {
            fl |= UE;
        }
    }
    (r, fl)
}

pub(crate) fn sign_of<F: Fp>(x: F) -> i32 {
    if x.is_zero() || x.is_nan_() {
        0
    } else if x.sign() {
        -1
    } else {
        1
    }
}

pub(crate) fn arith<F: Fp>(op: Op, a: F, b: F, mxcsr: u32) -> (F, u32) {
    let mut fl = 0;
    if a.is_snan() || b.is_snan() {
        fl |= IE;
    }
    if a.is_nan_() {
        return (a.quiet(), fl);
    }
    if b.is_nan_() {
        return (b.quiet(), fl);
    }
    if a.is_denormal() || b.is_denormal() {
        fl |= DE;
    }
    let b = if op == Op::Sub { -b } else { b };
    match op {
        Op::Add | Op::Sub => {
            if a.is_inf_() && b.is_inf_() && a.sign() != b.sign() {
                return (F::default_nan(), IE);
            }
        }
        Op::Mul => {
            if (a.is_inf_() && b.is_zero()) || (a.is_zero() && b.is_inf_()) {
                return (F::default_nan(), IE);
            }
        }
        Op::Div => {
            if (a.is_zero() && b.is_zero()) || (a.is_inf_() && b.is_inf_()) {
                return (F::default_nan(), IE);
            }
            if b.is_zero() && !a.is_inf_() {
                // Divide-by-zero takes precedence over the denormal-operand flag.
                return (F::inf(a.sign() != b.sign()), (fl & !DE) | ZE);
            }
        }
    }
    let finite = !a.is_inf_() && !b.is_inf_();
    let (r, err) = match op {
        Op::Add | Op::Sub => {
            let r = a + b;
            let err = if r.is_inf_() || !finite {
                0
            } else {
                // Fast2Sum with the larger operand first: exact, and unlike TwoSum its
                // intermediate (r - big) cannot overflow near the top of the range.
                let (big, small) =
                    if a.bits() & !(1 << (F::TOTAL - 1)) >= b.bits() & !(1 << (F::TOTAL - 1)) {
                        (a, b)
                    } else {
                        (b, a)
                    };
                sign_of(small - (r - big))
            };
            (r, err)
        }
        Op::Mul => {
            let r = a * b;
            let err = if r.is_inf_() || !finite {
                0
            } else {
                F::err_mul(a, b, r)
            };
            (r, err)
        }
        Op::Div => {
            let r = a / b;
            let err = if r.is_inf_() || !finite || b.is_inf_() {
                0
            } else {
                F::err_div(a, b, r)
            };
            (r, err)
        }
    };
    // Exact zero sums take the sign the rounding mode dictates (-0 only when rounding down).
    let r = if matches!(op, Op::Add | Op::Sub) && r.is_zero() && err == 0 && a.sign() != b.sign() {
        if (mxcsr >> 13) & 3 == 1 {
            -F::zero()
        } else {
            F::zero()
        }
    } else {
        r
    };
    let rc = (mxcsr >> 13) & 3;
    if r.is_inf_() && finite && rc != 0 && !exceeds_overflow_threshold(op, a, b) {
        // The exact value lies between MAX and MAX + ulp: only rounding away from zero
        // overflows; the other directed modes give ±MAX and merely inexact.
        let neg = r.sign();
        let away = (rc == 2 && !neg) || (rc == 1 && neg);
        if !away {
            let m = if neg {
                -F::max_finite()
            } else {
                F::max_finite()
            };
            return (m, fl | PE);
        }
    }
    let (r, f2) = finish(r, err, mxcsr, finite);
    (r, fl | f2)
}

/// Whether |a op b| (exact) reaches MAX + ulp = 2^(emax+1), decided at half scale where
/// nothing overflows. `b` is already negated for subtraction.
fn exceeds_overflow_threshold<F: Fp>(op: Op, a: F, b: F) -> bool {
    let h = F::half();
    let (s, err) = match op {
        Op::Add | Op::Sub => {
            let (x, y) = (a * h, b * h);
            let s = x + y;
            let mag = |v: F| v.bits() & !(1 << (F::TOTAL - 1));
            let (big, small) = if mag(x) >= mag(y) { (x, y) } else { (y, x) };
            (s, sign_of(small - (s - big)))
        }
        Op::Mul => {
            let x = a * h;
            let s = x * b;
            (s, F::err_mul(x, b, s))
        }
        Op::Div => {
            let x = a * h;
            let s = x / b;
            (s, F::err_div(x, b, s))
        }
    };
    if s.is_inf_() {
        return true;
    }
    let p = F::pow2_emax();
    let (mag, err) = if s.sign() { (-s, -err) } else { (s, err) };
    if mag > p {
        true
    } else if mag < p {
        false
    } else {
        err >= 0
    }
}

pub(crate) fn sqrt<F: Fp>(a: F, mxcsr: u32) -> (F, u32) {
    if a.is_nan_() {
        return (a.quiet(), if a.is_snan() { IE } else { 0 });
    }
    let de = if a.is_denormal() { DE } else { 0 };
    if a.sign() && !a.is_zero() {
        return (F::default_nan(), IE);
    }
    let r = a.sqrt_();
    if a.is_inf_() || a.is_zero() {
        return (r, de);
    }
    let err = F::err_sqrt(a, r);
    let (r, f) = finish(r, err, mxcsr, true);
    (r, f | de)
}

pub(crate) fn minmax<F: Fp>(max: bool, a: F, b: F) -> (F, u32) {
    let mut fl = 0;
    if a.is_nan_() || b.is_nan_() {
        return (b, IE);
    }
    if a.is_denormal() || b.is_denormal() {
        fl |= DE;
    }
    let pick_a = if max { a > b } else { a < b };
    (if pick_a { a } else { b }, fl)
}

pub(crate) fn compare<F: Fp>(pred: u8, a: F, b: F) -> (bool, u32) {
    let unordered = a.is_nan_() || b.is_nan_();
    let signaling_pred = matches!(pred & 7, 1 | 2 | 5 | 6);
    let mut fl = 0;
    if a.is_snan() || b.is_snan() || (unordered && signaling_pred) {
        fl |= IE;
    }
    if !unordered && (a.is_denormal() || b.is_denormal()) {
        fl |= DE;
    }
    let r = match pred & 7 {
        0 => a == b,
        1 => a < b,
        2 => a <= b,
        3 => unordered,
        4 => a != b,
        // NLT / NLE are true for unordered operands.
        5 => unordered || a >= b,
        6 => unordered || a > b,
        _ => !unordered,
    };
    (r, fl)
}

/// Float to integer (CVT*2SI / CVT*2DQ), `trunc` for the CVTT forms.
pub(crate) fn to_int<F: Fp + Into<f64>>(a: F, bits: u32, trunc: bool, mxcsr: u32) -> (u64, u32) {
    let indefinite = 1u64 << (bits - 1);
    if a.is_nan_() || a.is_inf_() {
        return (indefinite, IE);
    }
    // Conversions to integer report only invalid and precision (no denormal flag).
    let de = 0;
    let x: f64 = a.into();
    let r = if trunc {
        x.trunc()
    } else {
        match (mxcsr >> 13) & 3 {
            0 => x.round_ties_even(),
            1 => x.floor(),
            2 => x.ceil(),
            _ => x.trunc(),
        }
    };
    let lim = 2f64.powi(bits as i32 - 1);
    if r >= lim || r < -lim {
        return (indefinite, IE);
    }
    let v = (r as i64) as u64 & mask(bits / 8);
    (v, de | if r != x { PE } else { 0 })
}

/// Integer to float with MXCSR rounding.
pub(crate) fn from_int_f64(v: i64, mxcsr: u32) -> (f64, u32) {
    let r = v as f64;
    let back = r as i128;
    let err = (i128::from(v) - back).signum() as i32;
    if r == 9.223_372_036_854_776e18 && v > 0 {
        // 2^63 rounds from i64::MAX: the exact error is negative.
        return finish(r, -1, mxcsr, true);
    }
    finish(r, err, mxcsr, true)
}

pub(crate) fn from_int_f32(v: i64, mxcsr: u32) -> (f32, u32) {
    let r = v as f32;
    let back = r as f64 as i128;
    let err = if (r as f64) >= 9.223_372_036_854_776e18 {
        -1
    } else {
        (i128::from(v) - back).signum() as i32
    };
    finish(r, err, mxcsr, true)
}

pub(crate) fn f64_to_f32(a: f64, mxcsr: u32) -> (f32, u32) {
    if a.is_nan() {
        let q = f32::from_bits(
            (((a.to_bits() >> 63) as u32) << 31)
                | 0x7fc0_0000
                | ((a.to_bits() >> 29) as u32 & 0x3f_ffff),
        );
        return (q, if Fp::is_snan(a) { IE } else { 0 });
    }
    let de = if Fp::is_denormal(a) { DE } else { 0 };
    let r = a as f32;
    let rc = (mxcsr >> 13) & 3;
    if r.is_infinite() && !a.is_infinite() && rc != 0 && a.abs() < 2f64.powi(128) {
        // Between f32::MAX and MAX + ulp: only rounding away from zero overflows.
        let away = (rc == 2 && a > 0.0) || (rc == 1 && a < 0.0);
        if !away {
            return (if a < 0.0 { -f32::MAX } else { f32::MAX }, PE | de);
        }
    }
    if r.is_infinite() && !a.is_infinite() {
        let (r, f) = finish(r, 0, mxcsr, true);
        return (r, f | de);
    }
    let back = r as f64;
    let err = if a > back {
        1
    } else if a < back {
        -1
    } else {
        0
    };
    let (r, f) = finish(r, err, mxcsr, !a.is_infinite());
    (r, f | de)
}

pub(crate) fn f32_to_f64(a: f32) -> (f64, u32) {
    if a.is_nan() {
        let b = u64::from(a.to_bits());
        let q = f64::from_bits(((b >> 31) << 63) | 0x7ff8_0000_0000_0000 | ((b & 0x3f_ffff) << 29));
        return (q, if Fp::is_snan(a) { IE } else { 0 });
    }
    (f64::from(a), if Fp::is_denormal(a) { DE } else { 0 })
}

#[cfg(all(test, target_arch = "x86_64"))]
mod native_check {
    //! Millions of scalar FP operations compared against the host's SSE unit in-process:
    //! results and MXCSR flags for every rounding mode.
    use super::*;
    use std::arch::asm;

    fn native_f64(op: Op, a: f64, b: f64, mxcsr: u32) -> (u64, u32) {
        let mut csr = mxcsr;
        let mut x = a;
        // SAFETY: only XMM registers and the local MXCSR image are touched; the host MXCSR
        // is saved and restored around the operation.
        unsafe {
            let mut saved = 0u32;
            asm!("stmxcsr [{s}]", "ldmxcsr [{c}]", s = in(reg) &mut saved, c = in(reg) &csr);
            match op {
                Op::Add => asm!("addsd {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Sub => asm!("subsd {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Mul => asm!("mulsd {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Div => asm!("divsd {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
            }
            asm!("stmxcsr [{c}]", "ldmxcsr [{s}]", s = in(reg) &saved, c = in(reg) &mut csr);
        }
        (x.to_bits(), csr & 0x3f)
    }

    fn native_f32(op: Op, a: f32, b: f32, mxcsr: u32) -> (u32, u32) {
        let mut csr = mxcsr;
        let mut x = a;
        // SAFETY: as in native_f64.
        unsafe {
            let mut saved = 0u32;
            asm!("stmxcsr [{s}]", "ldmxcsr [{c}]", s = in(reg) &mut saved, c = in(reg) &csr);
            match op {
                Op::Add => asm!("addss {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Sub => asm!("subss {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Mul => asm!("mulss {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
                Op::Div => asm!("divss {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) b),
            }
            asm!("stmxcsr [{c}]", "ldmxcsr [{s}]", s = in(reg) &saved, c = in(reg) &mut csr);
        }
        (x.to_bits(), csr & 0x3f)
    }

    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Random bits biased towards nearby exponents so sums cancel and round often.
        fn f64_near(&mut self, other: f64) -> f64 {
            let r = self.next_u64();
            match r % 4 {
                0 => f64::from_bits(r >> 2),
                1 => f64::from_bits((other.to_bits() & !0xffff) ^ (r >> 48)),
                2 if r & 0x100 == 0 => f64::from_bits(r.rotate_left(7) & 0x000f_ffff_ffff_ffff), // denormal
                2 => f64::from_bits(0x7fe0_0000_0000_0000 | (r >> 12)), // near overflow
                _ => -other * (1.0 + f64::from_bits(0x3cb0_0000_0000_0000 | (r & 0xff))),
            }
        }
    }

    #[test]
    fn near_overflow_sum_is_inexact() {
        // TwoSum's intermediate overflows here; the result is still inexact.
        let a = f64::from_bits(0x7f80_07a1_43fe_8ae0);
        let b = f64::from_bits(0x7fef_ffff_ffff_ffff);
        for rc in 0..4 {
            let mxcsr = 0x1f80 | (rc << 13);
            let (nr, nf) = native_f64(Op::Sub, a, b, mxcsr);
            let (er, ef) = arith(Op::Sub, a, b, mxcsr);
            assert_eq!((nr, nf), (er.to_bits(), ef));
        }
    }

    #[test]
    fn directed_rounding_just_above_max_is_not_overflow() {
        // MAX - (-1.74e31): between MAX and MAX + ulp; rounding down is inexact, not overflow.
        let a = f32::from_bits(0x7f7f_ffff);
        let b = f32::from_bits(0xf35c_1df9);
        for rc in 0..4 {
            let mxcsr = 0x1f80 | (rc << 13);
            for op in [Op::Add, Op::Sub] {
                let (nr, nf) = native_f32(op, a, b, mxcsr);
                let (er, ef) = arith(op, a, b, mxcsr);
                assert_eq!((nr, nf), (er.to_bits(), ef), "op {} rc {rc}", op as u8);
            }
        }
    }

    fn native_cvtsd2ss(a: f64, mxcsr: u32) -> (u32, u32) {
        let mut csr = mxcsr;
        let mut x = 0f32;
        // SAFETY: as in native_f64.
        unsafe {
            let mut saved = 0u32;
            asm!("stmxcsr [{s}]", "ldmxcsr [{c}]", s = in(reg) &mut saved, c = in(reg) &csr);
            asm!("cvtsd2ss {x}, {y}", x = inout(xmm_reg) x, y = in(xmm_reg) a);
            asm!("stmxcsr [{c}]", "ldmxcsr [{s}]", s = in(reg) &saved, c = in(reg) &mut csr);
        }
        (x.to_bits(), csr & 0x3f)
    }

    #[test]
    fn narrowing_conversion_matches_host() {
        let mut r = Rng(0x77aa_55cc_1234_9876);
        for i in 0..20_000u32 {
            let mxcsr = 0x1f80 | ((i % 4) << 13) | if i % 7 == 0 { FTZ } else { 0 };
            let x = r.next_u64();
            // Around the f32 overflow threshold, around its denormal range, or anything.
            let a = match i % 3 {
                0 => {
                    f64::from(f32::MAX)
                        * (1.0 + (x >> 11) as f64 / (1u64 << 53) as f64 * 2f64.powi(-22))
                }
                1 => f64::from_bits(0x3800_0000_0000_0000 ^ (x >> 8)),
                _ => f64::from_bits(x),
            } * if x & 1 == 0 { 1.0 } else { -1.0 };
            let (nr, nf) = native_cvtsd2ss(a, mxcsr);
            let (er, ef) = f64_to_f32(a, mxcsr);
            assert_eq!(
                (nr, nf),
                (er.to_bits(), ef),
                "cvtsd2ss {a:e} ({:#x}) mxcsr {mxcsr:#x}",
                a.to_bits()
            );
        }
    }

    #[test]
    fn scalar_ops_match_host() {
        let n: u64 = std::env::var("X86EMU_FP_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut r = Rng(0x1234_5678_9abc_def1);
        for i in 0..n {
            let mxcsr = 0x1f80 | (((i % 4) as u32) << 13) | if i % 7 == 0 { FTZ } else { 0 };
            let a = if i % 5 == 0 {
                // Near the top of the range, where directed rounding decides overflow.
                f64::from_bits(0x7fef_ff00_0000_0000 | (r.next_u64() >> 24))
                    * if i % 2 == 0 { 1.0 } else { -1.0 }
            } else {
                f64::from_bits(r.next_u64())
            };
            let b = r.f64_near(a);
            for op in [Op::Add, Op::Sub, Op::Mul, Op::Div] {
                let (nr, nf) = native_f64(op, a, b, mxcsr);
                let (er, ef) = arith(op, a, b, mxcsr);
                assert_eq!(
                    (nr, nf),
                    (er.to_bits(), ef),
                    "f64 op {:?} a={a:e} ({:#x}) b={b:e} ({:#x}) mxcsr {mxcsr:#x}",
                    op as u8,
                    a.to_bits(),
                    b.to_bits()
                );
                let (a32, b32) = if i % 5 == 0 {
                    // f32 near its own top of range (the f64 values above cast to inf).
                    let x = r.next_u64();
                    let big = f32::from_bits(0x7f7f_0000 | (x as u32 & 0xffff))
                        * if x & (1 << 40) != 0 { -1.0 } else { 1.0 };
                    let other = f32::from_bits(
                        0x6800_0000
                            | ((x >> 16) as u32 & 0x0fff_ffff)
                            | ((x >> 32) as u32 & 0x8000_0000),
                    );
                    (big, other)
                } else {
                    (a as f32, b as f32)
                };
                let (nr, nf) = native_f32(op, a32, b32, mxcsr);
                let (er, ef) = arith(op, a32, b32, mxcsr);
                assert_eq!(
                    (nr, nf),
                    (er.to_bits(), ef),
                    "f32 op {:?} a={a32:e} ({:#x}) b={b32:e} ({:#x}) mxcsr {mxcsr:#x}",
                    op as u8,
                    a32.to_bits(),
                    b32.to_bits()
                );
            }
        }
    }
}
