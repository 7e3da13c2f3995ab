//! Guest RAM as host memory ranges.
//!
//! The same shape as the x86 CPU's map (gpa, host pointer, length), so a VMM hands both
//! CPUs the memory it mapped once; the soft TLB caches the host page behind a guest page.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use thiserror::Error;

/// Errors building the guest RAM map.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RamError {
    #[error("RAM region at {gpa:#x} (+{len:#x}) is not 4 KiB aligned")]
    Unaligned { gpa: u64, len: usize },
    #[error("RAM region at {gpa:#x} (+{len:#x}) overlaps the region at {other:#x}")]
    Overlap { gpa: u64, len: usize, other: u64 },
    #[error("RAM region at {gpa:#x} (+{len:#x}) wraps the physical address space")]
    Wraps { gpa: u64, len: usize },
}

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The guest-physical RAM map.
#[derive(Debug, Default)]
pub struct GuestRam {
    regions: Vec<Region>,
    /// Buffers allocated by [`GuestRam::add_owned`]; a Vec's heap storage never moves.
    owned: Vec<Vec<u8>>,
}

// SAFETY: the regions are plain memory whose owner guarantees it outlives every CPU using
// it (contract of `add_region`); guest memory is shared between harts and devices by design.
unsafe impl Send for GuestRam {}

impl GuestRam {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `len` bytes of host memory at `host` as guest RAM at `gpa`.
    ///
    /// # Safety
    /// `host..host+len` must be valid for reads and writes for as long as any CPU holding
    /// this map exists, and must only be accessed through raw pointers while a CPU runs.
    pub unsafe fn add_region(
        &mut self,
        gpa: u64,
        host: *mut u8,
        len: usize,
    ) -> Result<(), RamError> {
        if gpa & 0xfff != 0 || len & 0xfff != 0 {
            return Err(RamError::Unaligned { gpa, len });
        }
        let end = gpa
            .checked_add(len as u64)
            .ok_or(RamError::Wraps { gpa, len })?;
        if let Some(r) = self
            .regions
            .iter()
            .find(|r| gpa < r.gpa + r.len && r.gpa < end)
        {
            return Err(RamError::Overlap {
                gpa,
                len,
                other: r.gpa,
            });
        }
        self.regions.push(Region {
            gpa,
            len: len as u64,
            host,
        });
        Ok(())
    }

    /// Allocates zeroed RAM owned by this map and maps it at `gpa`.
    pub fn add_owned(&mut self, gpa: u64, len: usize) -> Result<(), RamError> {
        let mut buf = vec![0u8; len + 4096];
        let offset = buf.as_ptr().align_offset(4096).min(4096);
        let host = buf[offset..].as_mut_ptr();
        // SAFETY: `buf` has len bytes after `offset`; it lives in `self.owned` as long as
        // the map, and its heap buffer does not move when the Vec does.
        unsafe { self.add_region(gpa, host, len)? };
        self.owned.push(buf);
        Ok(())
    }

    /// Host pointer to the 4 KiB page holding `gpa`, if it is RAM.
    #[inline]
    pub fn page_ptr(&self, gpa: u64) -> Option<*mut u8> {
        let page = gpa & !0xfff;
        self.regions
            .iter()
            .find(|r| page >= r.gpa && page - r.gpa < r.len)
            .map(|r| r.host.wrapping_add((page - r.gpa) as usize))
    }

    /// Whether `gpa` is RAM.
    pub fn contains(&self, gpa: u64) -> bool {
        self.page_ptr(gpa).is_some()
    }

    /// Copies `data` into RAM at `gpa`; false if any byte is outside RAM.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> bool {
        for (i, b) in data.iter().enumerate() {
            let a = gpa.wrapping_add(i as u64);
            let Some(p) = self.page_ptr(a) else {
                return false;
            };
            // SAFETY: `p` is a RAM page (add_region contract) and the offset is in-page.
            unsafe { p.add((a & 0xfff) as usize).write(*b) };
        }
        true
    }

    /// Copies RAM at `gpa` into `data`; false if any byte is outside RAM.
    pub fn read_bytes(&self, gpa: u64, data: &mut [u8]) -> bool {
        for (i, b) in data.iter_mut().enumerate() {
            let a = gpa.wrapping_add(i as u64);
            let Some(p) = self.page_ptr(a) else {
                return false;
            };
            // SAFETY: as in write_bytes.
            *b = unsafe { p.add((a & 0xfff) as usize).read() };
        }
        true
    }

    /// Reads an aligned 8-byte page-table entry atomically; outside RAM reads as 0.
    pub(crate) fn load_u64_atomic(&self, gpa: u64) -> Option<u64> {
        let p = self.page_ptr(gpa)?;
        if gpa & 7 != 0 {
            return None;
        }
        // SAFETY: an aligned, in-page pointer into RAM; RAM is only accessed through raw
        // pointers and atomics, so an atomic view of it is sound.
        Some(
            unsafe { AtomicU64::from_ptr(p.add((gpa & 0xfff) as usize) as *mut u64) }
                .load(Ordering::SeqCst),
        )
    }

    /// Replaces an aligned 8-byte entry if it still holds `old` (A/D updates race with
    /// other harts' walks); false when it changed meanwhile.
    pub(crate) fn cas_u64(&self, gpa: u64, old: u64, new: u64) -> bool {
        let Some(p) = self.page_ptr(gpa) else {
            return true;
        };
        if gpa & 7 != 0 {
            return true;
        }
        // SAFETY: as in load_u64_atomic.
        unsafe { AtomicU64::from_ptr(p.add((gpa & 0xfff) as usize) as *mut u64) }
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The atomic cell behind an aligned 4-byte word of RAM, for AMOs.
    pub(crate) fn atomic_u32(&self, gpa: u64) -> Option<&AtomicU32> {
        let p = self.page_ptr(gpa)?;
        if gpa & 3 != 0 {
            return None;
        }
        // SAFETY: aligned, in-page RAM pointer living as long as `self` (add_region
        // contract); RAM is only accessed through raw pointers and atomics.
        Some(unsafe { AtomicU32::from_ptr(p.add((gpa & 0xfff) as usize) as *mut u32) })
    }

    /// The atomic cell behind an aligned 8-byte word of RAM, for AMOs.
    pub(crate) fn atomic_u64(&self, gpa: u64) -> Option<&AtomicU64> {
        let p = self.page_ptr(gpa)?;
        if gpa & 7 != 0 {
            return None;
        }
        // SAFETY: as in atomic_u32.
        Some(unsafe { AtomicU64::from_ptr(p.add((gpa & 0xfff) as usize) as *mut u64) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_and_unaligned_regions_are_refused() {
        let mut ram = GuestRam::new();
        ram.add_owned(0x8000_0000, 0x10000).unwrap();
        assert_eq!(
            ram.add_owned(0x8000_8000, 0x1000),
            Err(RamError::Overlap {
                gpa: 0x8000_8000,
                len: 0x1000,
                other: 0x8000_0000
            })
        );
        assert!(matches!(
            ram.add_owned(0x123, 0x1000),
            Err(RamError::Unaligned { .. })
        ));
    }

    #[test]
    fn bytes_round_trip_across_pages_and_stop_at_the_end() {
        let mut ram = GuestRam::new();
        ram.add_owned(0x1000, 0x2000).unwrap();
        assert!(ram.write_bytes(0x1ffe, &[1, 2, 3, 4]));
        let mut out = [0u8; 4];
        assert!(ram.read_bytes(0x1ffe, &mut out));
        assert_eq!(out, [1, 2, 3, 4]);
        assert!(!ram.write_bytes(0x2ffe, &[0; 4]));
    }
}
