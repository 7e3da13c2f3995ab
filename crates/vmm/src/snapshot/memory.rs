//! Guest memory in its own file: the RAM regions one after another, each at the file
//! offset the state file records. Pages that are all zero are left as holes (the file
//! is sparse), so an idle guest's snapshot writes little. A restore maps the file
//! MAP_PRIVATE: pages are read from it when the guest first touches them, and the
//! guest's writes stay in the new VMM's memory, never in the file.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The size of the pieces a Diff is copied onto its base in.
const CHUNK: usize = 64 << 10;
const PAGE: usize = 4096;
/// The most pages one write takes (1 MiB).
const MAX_RUN_PAGES: usize = 256;
/// The most threads a snapshot writes memory with.
const MAX_WRITERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("writing guest memory to {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("opening the memory file {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the memory file {path} has {have} bytes; the snapshot's guest memory needs {want}")]
    Size {
        path: std::path::PathBuf,
        want: u64,
        have: u64,
    },
    #[error("the snapshot's memory layout is invalid: {0}")]
    Layout(String),
    #[error("mapping the memory file {path}: {why}")]
    Map {
        path: std::path::PathBuf,
        why: String,
    },
}

/// The regions of `memory` and where they go in a file, one after another.
pub fn layout(memory: &GuestMemoryMmap) -> Vec<MemRegion> {
    let mut offset = 0;
    memory
        .iter()
        .map(|r| {
            let m = MemRegion {
                gpa: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            m
        })
        .collect()
}

pub(crate) fn all_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    // 256 bytes at a time, OR-ed without a branch per word (the compiler vectorizes
    // it): a zero page is read at memory speed, a non-zero one mostly ends early.
    let mut blocks = words.chunks_exact(32);
    head.iter().all(|&x| x == 0)
        && blocks.all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
        && tail.iter().all(|&x| x == 0)
}

/// Writes every region of `memory` to `path` as [`layout`] places them; returns that
/// layout. The VM must be paused. The file is written under a temporary name and renamed
/// into place: a VM restored from the file `path` names keeps its mapping of the old one.
pub fn write(memory: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemRegion>, MemoryError> {
    write_some(memory, path, None)
}

/// A Diff snapshot's memory file: as [`write`], but only the pages marked in `dirty` (a
/// bitmap of guest-physical page numbers), zero or not; every other page is a hole, to
/// be taken from the snapshot the diff follows ([`rebase`]).
pub fn write_diff(
    memory: &GuestMemoryMmap,
    path: &Path,
    dirty: &[u64],
) -> Result<Vec<MemRegion>, MemoryError> {
    write_some(memory, path, Some(dirty))
}

fn write_some(
    memory: &GuestMemoryMmap,
    path: &Path,
    dirty: Option<&[u64]>,
) -> Result<Vec<MemRegion>, MemoryError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let r = write_to(memory, &tmp, dirty).and_then(|regions| {
        // The old file goes first: ext4 writes out a file renamed over another at once
        // (its guard for programs that replace files without fsync), which made a
        // snapshot over an older one wait for the whole file to reach the disk (1.3 s
        // for 70 MiB here, against 0.2 s for a new one). A VM restored from the old
        // file keeps its mapping of it.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(MemoryError::Write {
                    path: path.into(),
                    source: e,
                })
            }
            _ => {}
        }
        std::fs::rename(&tmp, path)
            .map(|()| regions)
            .map_err(|source| MemoryError::Write {
                path: path.into(),
                source,
            })
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn write_to(
    memory: &GuestMemoryMmap,
    path: &Path,
    dirty: Option<&[u64]>,
) -> Result<Vec<MemRegion>, MemoryError> {
    let err = |source| MemoryError::Write {
        path: path.into(),
        source,
    };
    let regions = layout(memory);
    // Owner-only: it is the guest's memory.
    let f = super::format::private_file(path).map_err(err)?;
    let total: u64 = regions.iter().map(|r| r.len).sum();
    // Several writers: most of the time goes to the kernel finding page-cache pages for
    // the file, which is work each CPU can do (QEMU's migration thread and the `cat`
    // it writes a file through are two as well).
    let writers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WRITERS);
    for (region, m) in memory.iter().zip(&regions) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let len = usize::try_from(m.len).map_err(|e| MemoryError::Layout(e.to_string()))?;
        // SAFETY: `host` is the start of this region's mapping, `len` bytes long, alive
        // for as long as `memory`; the VM is paused, so nothing writes it meanwhile
        // (a racing writer would only make the copy stale, not unsound for u8 reads).
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        // A Full snapshot skips the pages the guest never touched without reading them.
        let known = match dirty {
            Some(_) => None,
            None => super::untouched::known_zero(
                host.cast_const(),
                len,
                region.file_offset().map(|fo| (fo.file(), fo.start())),
            ),
        };
        let region = Pages {
            file: &f,
            bytes,
            at: *m,
            known: known.as_ref(),
            dirty,
        };
        let pages = len / PAGE;
        // Stripes of whole 64-page words, one per writer.
        let stripe = pages.div_ceil(writers).div_ceil(64) * 64;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..writers)
                .map(|k| (k * stripe, ((k + 1) * stripe).min(pages)))
                .filter(|(a, b)| a < b)
                .map(|(a, b)| s.spawn(move || region.write(a, b)))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a memory writer panicked")))
            })
        })
        .map_err(err)?;
    }
    // The holes at the end, too.
    f.set_len(total).map_err(err)?;
    Ok(regions)
}

/// One region of guest memory on its way into the memory file.
#[derive(Clone, Copy)]
struct Pages<'a> {
    file: &'a File,
    bytes: &'a [u8],
    at: MemRegion,
    /// Pages known to be zero without reading them (a Full snapshot).
    known: Option<&'a super::untouched::KnownZero>,
    /// A Diff's bitmap of guest-physical pages to write (zero or not).
    dirty: Option<&'a [u64]>,
}

impl Pages<'_> {
    /// Writes pages `from..to` of the region that hold data (a Full snapshot) or that
    /// the dirty log marked (a Diff), in runs of up to [`MAX_RUN_PAGES`].
    fn write(&self, from: usize, to: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let put = |a: usize, b: usize| {
            self.file.write_all_at(
                &self.bytes[a * PAGE..b * PAGE],
                self.at.file_offset + (a * PAGE) as u64,
            )
        };
        let mut run: Option<(usize, usize)> = None;
        let mut i = from;
        while i < to {
            if i + 64 <= to && self.known.is_some_and(|k| k.word(i)) {
                if let Some((a, b)) = run.take() {
                    put(a, b)?;
                }
                i += 64;
                continue;
            }
            let wanted = match self.dirty {
                Some(map) => {
                    let pfn = self.at.gpa / PAGE as u64 + i as u64;
                    usize::try_from(pfn / 64)
                        .ok()
                        .and_then(|w| map.get(w))
                        .is_some_and(|w| w >> (pfn % 64) & 1 == 1)
                }
                None => {
                    !self.known.is_some_and(|k| k.page(i))
                        && !all_zero(&self.bytes[i * PAGE..(i + 1) * PAGE])
                }
            };
            run = match (run, wanted) {
                (Some((a, b)), true) if b == i && b - a < MAX_RUN_PAGES => Some((a, i + 1)),
                (Some((a, b)), true) => {
                    put(a, b)?;
                    Some((i, i + 1))
                }
                (None, true) => Some((i, i + 1)),
                (Some((a, b)), false) => {
                    put(a, b)?;
                    None
                }
                (None, false) => None,
            };
            i += 1;
        }
        if let Some((a, b)) = run {
            put(a, b)?;
        }
        Ok(())
    }
}

/// Copies what a Diff snapshot's memory file at `diff` holds (its data, not its holes)
/// onto the memory file `base` of the snapshot it follows, in place (Firecracker's
/// `rebase-snap`): `base` then is the memory of the diff's snapshot. Both must have the
/// same size. Needs a file system that reports holes (SEEK_HOLE), as the ones Linux
/// mounts for local files do; on one that does not, the holes' zeros would be copied too.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, MemoryError> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MemoryError::Open { path, source }
    };
    let d = File::open(diff).map_err(open_err(diff))?;
    let b = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(open_err(base))?;
    let len = d.metadata().map_err(open_err(diff))?.len();
    let have = b.metadata().map_err(open_err(base))?.len();
    if have != len {
        return Err(MemoryError::Size {
            path: base.into(),
            want: len,
            have,
        });
    }
    let seek = |from: u64, whence: libc::c_int| -> Result<Option<u64>, MemoryError> {
        let at = libc::off_t::try_from(from).map_err(|e| MemoryError::Layout(e.to_string()))?;
        // SAFETY: lseek on a descriptor `d` owns; it moves only that file's offset.
        let r = unsafe { libc::lseek(d.as_raw_fd(), at, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `from`.
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(MemoryError::Open {
                    path: diff.into(),
                    source: e,
                }),
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut copied = 0;
    let mut pos = 0;
    let mut buf = vec![0u8; CHUNK];
    while pos < len {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = start;
        while at < end {
            let n = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            let chunk = &mut buf[..n];
            d.read_exact_at(chunk, at).map_err(open_err(diff))?;
            b.write_all_at(chunk, at)
                .map_err(|source| MemoryError::Write {
                    path: base.into(),
                    source,
                })?;
            at += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    b.sync_all().map_err(|source| MemoryError::Write {
        path: base.into(),
        source,
    })?;
    Ok(copied)
}

/// Maps `path` as guest memory laid out as `regions`, private to this process.
pub fn map(path: &Path, regions: &[MemRegion]) -> Result<GuestMemoryMmap, MemoryError> {
    let want = regions
        .iter()
        .try_fold(0u64, |end, r| {
            r.file_offset
                .checked_add(r.len)
                .map(|e| end.max(e))
                .filter(|_| r.len > 0 && r.len % 4096 == 0 && r.file_offset % 4096 == 0)
        })
        .ok_or_else(|| {
            MemoryError::Layout("a region is empty, unaligned or out of range".into())
        })?;
    let file = File::open(path).map_err(|source| MemoryError::Open {
        path: path.into(),
        source,
    })?;
    let have = file
        .metadata()
        .map_err(|source| MemoryError::Open {
            path: path.into(),
            source,
        })?
        .len();
    if have != want {
        return Err(MemoryError::Size {
            path: path.into(),
            want,
            have,
        });
    }
    let file = std::sync::Arc::new(file);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let len = usize::try_from(r.len).map_err(|e| MemoryError::Layout(e.to_string()))?;
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::Map {
            path: path.into(),
            why: e.to_string(),
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", r.gpa)))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))
}
