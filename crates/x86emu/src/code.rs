//! Which guest pages hold code, shared by every CPU of a VM.
//!
//! A CPU marks a RAM page when it has checked blocks decoded from it in its current code
//! epoch; any CPU's store to a marked page clears the mark and counts a code write. Each
//! CPU compares that count with the last one it saw at its block boundaries and, when it
//! moved, checks its cached blocks against memory again. So code one vCPU writes is seen
//! by the others without a lock around execution: at the latest at their next block
//! boundary outside a chain of compiled blocks, which is what x86's cross-modifying-code
//! rule asks of a guest anyway (the writer makes the others serialise, by an IPI).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

#[derive(Debug)]
pub struct CodeTracker {
    /// A byte per RAM page (compiled code reads it unchecked, so it covers all of RAM).
    pages: Box<[AtomicU8]>,
    /// Stores to marked pages so far, by any CPU.
    writes: AtomicU64,
}

impl CodeTracker {
    /// A tracker for RAM that ends at guest-physical `ram_end`.
    pub fn new(ram_end: u64) -> Self {
        let n = (ram_end >> 12) as usize;
        CodeTracker {
            pages: (0..n).map(|_| AtomicU8::new(0)).collect(),
            writes: AtomicU64::new(0),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    pub(crate) fn mark(&self, pfn: usize) {
        if let Some(b) = self.pages.get(pfn) {
            b.store(1, Ordering::Relaxed);
        }
    }

    /// A store to `pfn`: true if the page held checked code (the caller's own epoch must
    /// move; the others' move when they see `writes`).
    #[inline(always)]
    pub(crate) fn note_write(&self, pfn: usize) -> bool {
        match self.pages.get(pfn) {
            Some(b) if b.load(Ordering::Relaxed) != 0 => {
                b.store(0, Ordering::Relaxed);
                self.writes.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Something other than a CPU (a device's DMA, the VMM) wrote guest-physical
    /// `gpa..gpa + len`: every CPU checks its blocks from there again before running them
    /// (at its next block boundary), as for another CPU's store.
    pub fn note_external_write(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (gpa >> 12) as usize;
        let last = (gpa.saturating_add(len - 1) >> 12) as usize;
        for pfn in first..=last.min(self.pages.len().saturating_sub(1)) {
            self.note_write(pfn);
        }
    }

    #[inline(always)]
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// For compiled code: the page bytes (AtomicU8 has u8's layout).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.pages.as_ptr().cast()
    }
}
