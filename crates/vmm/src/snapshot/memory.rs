//! Guest memory in its own file: the RAM regions one after another, each at the file
//! offset the state file records. Pages that are all zero are left as holes (the file
//! is sparse), so an idle guest's snapshot writes little. A restore maps the file
//! MAP_PRIVATE: pages are read from it when the guest first touches them, and the
//! guest's writes stay in the new VMM's memory, never in the file.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
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

/// The size of the runs checked for zeros.
const CHUNK: usize = 64 << 10;

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
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Writes every region of `memory` to `path` as [`layout`] places them; returns that
/// layout. The VM must be paused. The file is written under a temporary name and renamed
/// into place: a VM restored from the file `path` names keeps its mapping of the old one.
pub fn write(memory: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemRegion>, MemoryError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let r = write_to(memory, &tmp).and_then(|regions| {
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

fn write_to(memory: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemRegion>, MemoryError> {
    let err = |source| MemoryError::Write {
        path: path.into(),
        source,
    };
    let regions = layout(memory);
    // Owner-only: it is the guest's memory.
    let mut f = super::format::private_file(path).map_err(err)?;
    let total: u64 = regions.iter().map(|r| r.len).sum();
    for (region, m) in memory.iter().zip(&regions) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let len = usize::try_from(m.len).map_err(|e| MemoryError::Layout(e.to_string()))?;
        // SAFETY: `host` is the start of this region's mapping, `len` bytes long, alive
        // for as long as `memory`; the VM is paused, so nothing writes it meanwhile
        // (a racing writer would only make the copy stale, not unsound for u8 reads).
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let mut pos = 0;
        while pos < len {
            let end = (pos + CHUNK).min(len);
            let chunk = &bytes[pos..end];
            if !all_zero(chunk) {
                f.seek(SeekFrom::Start(m.file_offset + pos as u64))
                    .map_err(err)?;
                f.write_all(chunk).map_err(err)?;
            }
            pos = end;
        }
    }
    // The holes at the end, too.
    f.set_len(total).map_err(err)?;
    Ok(regions)
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
