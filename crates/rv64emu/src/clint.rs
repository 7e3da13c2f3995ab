//! The CLINT's per-hart registers (SiFive layout: MSIP words from 0, MTIMECMP from
//! 0x4000, MTIME at 0xbff8), shared by the harts: a hart writing another's MSIP is an
//! inter-processor interrupt, which the target sees at its next interrupt check (or
//! within its WFI poll).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The register state of every hart's CLINT slot.
#[derive(Debug)]
pub struct Clint {
    msip: Box<[AtomicBool]>,
    mtimecmp: Box<[AtomicU64]>,
}

impl Default for Clint {
    fn default() -> Self {
        Self::new(1)
    }
}

impl Clint {
    /// Slots for `harts` harts: no software interrupt, timers never due.
    pub fn new(harts: usize) -> Self {
        let harts = harts.max(1);
        Clint {
            msip: (0..harts).map(|_| AtomicBool::new(false)).collect(),
            mtimecmp: (0..harts).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    pub fn harts(&self) -> usize {
        self.msip.len()
    }

    #[inline]
    pub fn msip(&self, hart: usize) -> bool {
        self.msip
            .get(hart)
            .is_some_and(|m| m.load(Ordering::Acquire))
    }

    pub fn set_msip(&self, hart: usize, on: bool) {
        if let Some(m) = self.msip.get(hart) {
            m.store(on, Ordering::Release);
        }
    }

    #[inline]
    pub fn mtimecmp(&self, hart: usize) -> u64 {
        self.mtimecmp
            .get(hart)
            .map_or(u64::MAX, |m| m.load(Ordering::Acquire))
    }

    /// Writes the bytes of hart `hart`'s MTIMECMP that `mask` selects.
    pub fn write_mtimecmp(&self, hart: usize, value: u64, mask: u64) {
        if let Some(m) = self.mtimecmp.get(hart) {
            let _ = m.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some((old & !mask) | (value & mask))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_hart_and_out_of_range_harts_are_ignored() {
        let c = Clint::new(2);
        c.set_msip(1, true);
        assert!(!c.msip(0) && c.msip(1));
        c.write_mtimecmp(0, 0x1234, 0xffff);
        assert_eq!(c.mtimecmp(0), !0xffff | 0x1234);
        assert_eq!(c.mtimecmp(1), u64::MAX);
        c.set_msip(7, true);
        assert!(!c.msip(7));
        assert_eq!(c.mtimecmp(7), u64::MAX);
    }
}
