//! Which pages of guest memory were never touched, so a snapshot can leave them as holes
//! without reading them. Reading a page the guest never used is not free: it faults in
//! the zero page (most of a freshly booted guest's memory is such pages; reading them
//! all was most of a Full snapshot's time). The kernel says which pages a mapping has
//! in /proc/self/pagemap: a page neither present nor swapped out was never written
//! since the mapping was made. Such a page of an anonymous mapping is zero; of a private
//! file mapping (a restored VM's memory) it is the file's, so zero only where the file
//! has a hole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

const PAGE: u64 = 4096;
/// pagemap entry bit 63: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap entry bit 62: the page is in swap.
const PM_SWAPPED: u64 = 1 << 62;
/// Entries read at a time (512 KiB of pagemap).
const BATCH: usize = 64 << 10;

/// A bit per page of a mapping: set where the page is known to be zero.
#[derive(Debug)]
pub(crate) struct KnownZero {
    bits: Vec<u64>,
}

impl KnownZero {
    /// Whether page `i` of the mapping is known to be zero.
    pub(crate) fn page(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Whether the 64 pages from `i` (a multiple of 64) are all known to be zero.
    pub(crate) fn word(&self, i: usize) -> bool {
        i.is_multiple_of(64) && self.bits.get(i / 64) == Some(&u64::MAX)
    }
}

/// The never-touched pages of the `len` bytes mapped at `host` (page-aligned), which
/// map `backing` (file, offset) privately or, without it, anonymous memory. None where
/// the kernel does not say (no pagemap): every page is then read.
pub(crate) fn known_zero(
    host: *const u8,
    len: usize,
    backing: Option<(&File, u64)>,
) -> Option<KnownZero> {
    let pages = len / PAGE as usize;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let first = host as u64 / PAGE;
    let mut entries = vec![0u8; BATCH.min(pages.max(1)) * 8];
    let mut i = 0;
    while i < pages {
        let n = BATCH.min(pages - i);
        let buf = &mut entries[..n * 8];
        pagemap
            .read_exact_at(buf, (first + i as u64) * 8)
            .map_err(|e| tracing::debug!("reading /proc/self/pagemap: {e}"))
            .ok()?;
        for (k, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if e & (PM_PRESENT | PM_SWAPPED) == 0 {
                let p = i + k;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        i += n;
    }
    if let Some((file, offset)) = backing {
        // Untouched pages read the file: those over its data are not known zero.
        for (start, end) in data_ranges(file, offset, len as u64)? {
            let from = (start - offset) / PAGE;
            let to = (end - offset).div_ceil(PAGE);
            for p in from..to {
                let p = p as usize;
                if let Some(w) = bits.get_mut(p / 64) {
                    *w &= !(1 << (p % 64));
                }
            }
        }
    }
    Some(KnownZero { bits })
}

/// The byte ranges of `file` within `offset..offset + len` that hold data (not holes),
/// by SEEK_DATA/SEEK_HOLE; None if the file system cannot say.
fn data_ranges(file: &File, offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    let end = offset.checked_add(len)?;
    let seek = |from: u64, whence: libc::c_int| -> Result<Option<u64>, ()> {
        let at = libc::off_t::try_from(from).map_err(|_| ())?;
        // SAFETY: lseek on a descriptor `file` owns; it moves only that file's offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r < 0 {
            // ENXIO: no data at or after `from`.
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(()),
            };
        }
        u64::try_from(r).map(Some).map_err(|_| ())
    };
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let Some(start) = seek(pos, libc::SEEK_DATA).ok()? else {
            break;
        };
        if start >= end {
            break;
        }
        let stop = seek(start, libc::SEEK_HOLE).ok()?.unwrap_or(end).min(end);
        out.push((start, stop));
        pos = stop.max(start + 1);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};

    fn host(ram: &GuestMemoryMmap) -> (*const u8, usize) {
        let r = ram.iter().next().unwrap();
        let p = r.get_host_address(MemoryRegionAddress(0)).unwrap();
        (p.cast_const(), r.len() as usize)
    }

    #[test]
    fn pages_never_touched_are_known_zero_and_touched_ones_are_not() {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        ram.write_slice(&[1], GuestAddress(0x3000)).unwrap();
        // Read (the zero page is mapped): present, so it is read, not assumed.
        let mut b = [0u8];
        ram.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        let (p, len) = host(&ram);
        let k = known_zero(p, len, None).expect("this kernel has /proc/self/pagemap");
        assert!(k.page(0) && k.page(255) && k.page(0x4));
        assert!(!k.page(3), "a written page");
        assert!(!k.page(5), "a page read through the zero page");
        assert!(!k.word(0) && k.word(64) && k.word(192));
        assert!(!k.word(65), "not a word's first page");
        assert!(!k.page(256) && !k.word(256), "past the mapping");
    }

    #[test]
    fn pages_of_a_file_mapping_are_known_zero_only_over_its_holes() {
        let dir = std::env::temp_dir().join(format!("vessel-untouched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[7; 4096], 0x2000).unwrap();
        drop(f);
        let regions = [crate::snapshot::MemRegion {
            gpa: 0,
            len: 1 << 20,
            file_offset: 0,
        }];
        let ram = crate::snapshot::memory::map(&path, &regions).unwrap();
        let (p, len) = host(&ram);
        let file = File::open(&path).unwrap();
        let k = known_zero(p, len, Some((&file, 0))).unwrap();
        assert!(
            !k.page(2),
            "the file's data, never touched through the mapping"
        );
        assert!(k.page(0) && k.page(3) && k.page(255));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
