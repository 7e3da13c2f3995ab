//! Arithmetic flag computation and condition codes.

use iced_x86::ConditionCode;

use super::operand::{mask, sign_bit};
use crate::cpu::Core;
use crate::state::flags::*;

#[inline(always)]
pub(crate) fn parity(v: u64) -> u64 {
    // Nibble-folding parity: no POPCNT needed on baseline x86-64 hosts.
    let b = (v as u8) ^ ((v as u8) >> 4);
    ((0x6996u64 >> (b & 0xf)) & 1 ^ 1) << 2
}

/// SF, ZF, PF of a `size`-byte result.
#[inline(always)]
pub(crate) fn szp(res: u64, size: u32) -> u64 {
    let r = res & mask(size);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

/// Flags of `a + b + carry` (result already computed, unmasked is fine).
#[inline(always)]
pub(crate) fn add_flags(a: u64, b: u64, carry: u64, res: u64, size: u32) -> u64 {
    let m = mask(size);
    let (a, b, r) = (a & m, b & m, res & m);
    let mut f = szp(r, size);
    let cf = if size == 8 {
        r < a || (carry != 0 && r == a)
    } else {
        (a + b + carry) > m
    };
    if cf {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    f | ((a ^ b ^ r) & AF)
}

/// Flags of `a - b - borrow`.
#[inline(always)]
pub(crate) fn sub_flags(a: u64, b: u64, borrow: u64, res: u64, size: u32) -> u64 {
    let m = mask(size);
    let (a, b, r) = (a & m, b & m, res & m);
    let mut f = szp(r, size);
    let cf = if borrow != 0 { a <= b } else { a < b };
    if cf {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    f | ((a ^ b ^ r) & AF)
}

/// Flags of AND/OR/XOR/TEST: CF=OF=0, AF cleared (architecturally undefined).
#[inline(always)]
pub(crate) fn logic_flags(res: u64, size: u32) -> u64 {
    szp(res, size)
}

impl Core {
    /// Replaces the six status flags with `f`.
    #[inline(always)]
    pub(crate) fn set_status(&mut self, f: u64) {
        self.s.rflags = (self.s.rflags & !STATUS) | (f & STATUS);
    }

    /// Replaces the status flags selected by `which`.
    #[inline(always)]
    pub(crate) fn set_flags_masked(&mut self, f: u64, which: u64) {
        self.s.rflags = (self.s.rflags & !which) | (f & which);
    }

    #[inline(always)]
    pub(crate) fn flag(&self, f: u64) -> bool {
        self.s.rflags & f != 0
    }

    /// Evaluates a condition code against RFLAGS.
    #[inline]
    pub(crate) fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.s.rflags;
        let cf = f & CF != 0;
        let zf = f & ZF != 0;
        let sf = f & SF != 0;
        let of = f & OF != 0;
        let pf = f & PF != 0;
        match cc {
            ConditionCode::None => true,
            ConditionCode::o => of,
            ConditionCode::no => !of,
            ConditionCode::b => cf,
            ConditionCode::ae => !cf,
            ConditionCode::e => zf,
            ConditionCode::ne => !zf,
            ConditionCode::be => cf || zf,
            ConditionCode::a => !cf && !zf,
            ConditionCode::s => sf,
            ConditionCode::ns => !sf,
            ConditionCode::p => pf,
            ConditionCode::np => !pf,
            ConditionCode::l => sf != of,
            ConditionCode::ge => sf == of,
            ConditionCode::le => zf || sf != of,
            ConditionCode::g => !zf && sf == of,
        }
    }
}
