//! Exception vectors and the fault value that instruction execution returns.

/// Exception vectors (SDM Vol. 3 table 6-1).
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;
}

/// Page-fault error code bits.
pub mod pf {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

/// An event that interrupts instruction execution and is delivered through the IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error: Option<u32>,
    /// Raised by INT n / INT3 / INTO: returns to the next instruction and checks gate DPL.
    pub soft: bool,
}

impl Fault {
    pub const fn new(vector: u8) -> Self {
        Fault {
            vector,
            error: None,
            soft: false,
        }
    }
    pub const fn with_error(vector: u8, error: u32) -> Self {
        Fault {
            vector,
            error: Some(error),
            soft: false,
        }
    }
    pub const fn ud() -> Self {
        Self::new(vector::UD)
    }
    pub const fn gp(error: u32) -> Self {
        Self::with_error(vector::GP, error)
    }
    pub const fn gp0() -> Self {
        Self::gp(0)
    }
    pub const fn ss(error: u32) -> Self {
        Self::with_error(vector::SS, error)
    }
    pub const fn de() -> Self {
        Self::new(vector::DE)
    }
    pub const fn np(error: u32) -> Self {
        Self::with_error(vector::NP, error)
    }
    pub const fn nm() -> Self {
        Self::new(vector::NM)
    }
}

/// Exception classes for the double-fault rules (SDM Vol. 3 table 6-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

pub(crate) fn class(v: u8) -> Class {
    match v {
        vector::DE | vector::TS | vector::NP | vector::SS | vector::GP => Class::Contributory,
        vector::PF => Class::PageFault,
        vector::DF => Class::DoubleFault,
        _ => Class::Benign,
    }
}

/// Result of instruction-level operations.
pub type Result<T> = core::result::Result<T, Fault>;
