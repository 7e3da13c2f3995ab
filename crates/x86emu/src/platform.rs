//! How guest memory and devices reach the CPU.
//!
//! RAM is handed over once as host pointer ranges so the soft TLB can cache host pointers
//! and a TLB hit never leaves the CPU; everything else (MMIO, port I/O) is a call into the
//! VMM through [`Platform`].

use thiserror::Error;

/// Device side of the CPU: MMIO and port I/O. The VMM implements it.
pub trait Platform {
    /// A read from guest-physical `gpa` that is not RAM.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    /// A write to guest-physical `gpa` that is not RAM.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    /// IN from `port`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// OUT to `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// Polled after every instruction that performed MMIO, port I/O or a platform MSR
    /// access: returning true ends
    /// [`crate::Core::run`] with [`crate::RunExit::StopRequested`] once that instruction
    /// has completed.
    fn stop_requested(&mut self) -> bool {
        false
    }
    /// RDMSR of an MSR the platform implements (local APIC, paravirtual clocks); None
    /// leaves it to the CPU.
    fn msr_read(&mut self, _index: u32) -> Option<u64> {
        None
    }
    /// WRMSR: Some(true) handled, Some(false) raises #GP, None leaves it to the CPU.
    fn msr_write(&mut self, _index: u32, _value: u64) -> Option<bool> {
        None
    }
}

/// A platform with no devices: MMIO reads return all-ones, writes are dropped.
#[derive(Debug, Default)]
pub struct NoDevices;

impl Platform for NoDevices {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&mut self, _port: u16, _data: &[u8]) {}
}

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
struct RamRegion {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The guest-physical RAM map: (gpa, host pointer, length) ranges.
#[derive(Debug, Default)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    /// Backing buffers allocated by [`GuestRam::add_owned`]; their heap storage never moves.
    owned: Vec<Vec<u8>>,
}

// SAFETY: the regions are plain memory whose owner (the VMM) guarantees outlives every CPU
// using it (contract of `add_region`); guest memory is shared between vCPU threads by design,
// exactly as KVM shares it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    pub fn new() -> Self {
        Self::default()
    }

    /// The end of the highest RAM region (0 without RAM).
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa + r.len)
            .max()
            .unwrap_or(0)
    }

    /// Maps `len` bytes of host memory at `host` as guest RAM at `gpa`.
    ///
    /// # Safety
    /// `host..host+len` must be valid for reads and writes for as long as any CPU holding
    /// this map exists, and must not be accessed through Rust references that assume
    /// exclusivity while a CPU runs (other vCPUs and devices may access it concurrently
    /// through raw pointers, like a guest's other processors).
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
        self.regions.push(RamRegion {
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
        // SAFETY: `buf` has len bytes after `offset`; it is kept in `self.owned` for the life
        // of the map and a Vec's heap buffer does not move when the Vec is moved.
        unsafe { self.add_region(gpa, host, len)? };
        self.owned.push(buf);
        Ok(())
    }

    /// Host pointer to the 4 KiB page holding `gpa`, if it is RAM.
    #[inline]
    pub(crate) fn page_ptr(&self, gpa: u64) -> Option<*mut u8> {
        let page = gpa & !0xfff;
        self.regions
            .iter()
            .find(|r| page >= r.gpa && page - r.gpa < r.len)
            // The offset is below `len`, so it stays inside the region.
            .map(|r| r.host.wrapping_add((page - r.gpa) as usize))
    }

    /// Atomically replaces a page-table entry (8 bytes if `wide`, else 4) at `gpa` if it
    /// still holds `old`. Returns false only when the entry changed meanwhile; entries
    /// outside RAM (or misaligned) are left alone and count as done.
    pub(crate) fn compare_exchange_pte(&self, gpa: u64, old: u64, new: u64, wide: bool) -> bool {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        let size = if wide { 8 } else { 4 };
        let Some(page) = self.page_ptr(gpa) else {
            return true;
        };
        let off = (gpa & 0xfff) as usize;
        if !off.is_multiple_of(size) {
            return true;
        }
        // SAFETY: `page` is a valid RAM page (add_region contract), off is aligned to the
        // access size and inside the page; guest RAM is only accessed through raw pointers
        // and atomics, so an atomic view of it is sound.
        unsafe {
            let p = page.add(off);
            if wide {
                AtomicU64::from_ptr(p as *mut u64)
                    .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            } else {
                AtomicU32::from_ptr(p as *mut u32)
                    .compare_exchange(old as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            }
        }
    }

    /// Reads a page-table entry atomically (no torn reads while another vCPU updates it);
    /// entries outside RAM read as 0 (not present).
    pub(crate) fn load_pte(&self, gpa: u64, wide: bool) -> u64 {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        let size = if wide { 8 } else { 4 };
        let off = (gpa & 0xfff) as usize;
        let Some(page) = self.page_ptr(gpa) else {
            return 0;
        };
        if !off.is_multiple_of(size) {
            return 0;
        }
        // SAFETY: as in compare_exchange_pte: an aligned, in-page pointer into RAM.
        unsafe {
            let p = page.add(off);
            if wide {
                AtomicU64::from_ptr(p as *mut u64).load(Ordering::Acquire)
            } else {
                u64::from(AtomicU32::from_ptr(p as *mut u32).load(Ordering::Acquire))
            }
        }
    }

    /// Reads guest-physical memory that is RAM; false if any byte is not RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let a = gpa.wrapping_add(done as u64);
            let Some(p) = self.page_ptr(a) else {
                return false;
            };
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(buf.len() - done);
            // SAFETY: `p` is a valid page of a registered region (contract of add_region) and
            // off + n <= 4096 stays inside that page.
            unsafe {
                std::ptr::copy_nonoverlapping(p.add(off), buf[done..].as_mut_ptr(), n);
            }
            done += n;
        }
        true
    }

    /// Writes guest-physical memory that is RAM; false if any byte is not RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let a = gpa.wrapping_add(done as u64);
            let Some(p) = self.page_ptr(a) else {
                return false;
            };
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(buf.len() - done);
            // SAFETY: as in `read`; the page is writable host memory per add_region's contract.
            unsafe {
                std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), p.add(off), n);
            }
            done += n;
        }
        true
    }
}
