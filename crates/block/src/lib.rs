//! Disk image backends for Vessel: raw files and qcow2 (v3, and v2) with backing chains,
//! plus the image operations the CLI and the storage manager use (create, info, convert,
//! check, resize).
//!
//! Image files are hostile input: every header field and table entry is validated before
//! use, nothing is sized from an unchecked value, and malformed images give typed errors.
//!
//! Format probing: [`open`] with `format: None` treats a file starting with the qcow2 magic
//! as qcow2 and anything else as raw (logging a warning). It is for the image tools
//! (`vessel img`, like `qemu-img`) only. A disk a guest can write must never be probed: the
//! guest could write a qcow2 header naming any host file as its "backing file" onto its raw
//! disk and read that file after the next open. Disks for guests are opened with
//! [`open_guest_disk`], which never interprets an image's content as a format it was not
//! told, and refuses backing files whose format the image does not record.
//!
//! ```
//! use block::{BlockBackend, Format};
//!
//! let dir = std::env::temp_dir().join(format!("block-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let base = dir.join("base.raw");
//! let top = dir.join("top.qcow2");
//! block::create(&base, Format::Raw, Some(1 << 20), None).unwrap();
//! block::create(&top, Format::Qcow2, None, Some(("base.raw", Some(Format::Raw)))).unwrap();
//!
//! let mut disk = block::open(&top, Some(Format::Qcow2), false).unwrap();
//! assert_eq!(disk.size(), 1 << 20);
//! disk.write_at(4096, b"hello").unwrap();
//! disk.flush().unwrap();
//! let mut buf = [0u8; 5];
//! disk.read_at(4096, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! drop(disk);
//!
//! assert!(block::check(&top, None).unwrap().is_consistent());
//! assert_eq!(std::fs::read(&base).unwrap(), vec![0u8; 1 << 20]); // base untouched
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub mod error;
pub mod folder;
pub mod lock;
pub mod opened_chain;
pub mod ops;
pub mod qcow2;
pub mod raw;
pub mod storage;

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use tracing::{debug, warn};

pub use error::{BlockError, Qcow2Error};
pub use folder::{Folder, FolderError};
pub use opened_chain::{
    open_guest_disk_chain, open_guest_disk_chain_in, open_guest_disk_files, ChainFile,
};
pub use ops::{
    check, convert, create, create_in, info, info_in, resize, resize_in, CheckReport,
    CreateOptions, ImageInfo,
};
pub use qcow2::{Qcow2, Qcow2Disk};
pub use raw::Raw;
pub use storage::Storage;

/// Longest backing chain [`open`] follows.
pub const MAX_BACKING_CHAIN: usize = 16;

/// Whether a range holds data or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// May hold non-zero bytes.
    Data,
    /// Reads as zeros (unallocated, zero cluster, or hole).
    Zero,
}

/// A disk as the virtio-blk device sees it: byte-addressed, fixed size.
pub trait BlockBackend: Send + fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from guest `offset`; the range must lie within [`BlockBackend::size`].
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` at guest `offset`; durable only after [`BlockBackend::flush`].
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Fills `bufs` in turn from guest `offset` on. Raw images do it in one `preadv`
    /// (the device passes buffers in guest RAM, so nothing is copied); other formats
    /// read each buffer in place.
    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Result<(), BlockError> {
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_at(at, b)?;
            at = at.saturating_add(b.len() as u64);
        }
        Ok(())
    }
    /// [`BlockBackend::read_vectored_at`] only if it needs no disk access (raw images
    /// whose bytes are in the host's page cache): true when done; false when the caller
    /// must do the full read (the buffers may hold part of the data meanwhile). Errors
    /// are left to that read. By default nothing is tried.
    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [io::IoSliceMut<'_>]) -> bool {
        let _ = (offset, bufs);
        false
    }
    /// Whether a write is one positioned write into the host file and nothing else
    /// (raw images): no metadata of ours to update or allocate, so a small one usually
    /// ends in the host's page cache at once. A device may then serve it on a vCPU
    /// rather than wake its I/O thread. By default false.
    fn writes_in_place(&self) -> bool {
        false
    }
    /// Writes `bufs` in turn from guest `offset` on (one `pwritev` for raw images).
    fn write_vectored_at(
        &mut self,
        offset: u64,
        bufs: &[io::IoSlice<'_>],
    ) -> Result<(), BlockError> {
        let mut at = offset;
        for b in bufs {
            self.write_at(at, b)?;
            at = at.saturating_add(b.len() as u64);
        }
        Ok(())
    }
    /// Makes all completed writes durable.
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Tells the backend the range is unused; its content becomes unspecified (zeros or the
    /// old data).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes the range read as zeros, deallocating where the format allows.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Status of a run starting at `offset` (at most `len` bytes): returns the status and
    /// the run's length (> 0 when `len` > 0).
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError>;
    /// The reads and writes of this disk that several threads may do at once, without
    /// the `&mut` access the rest of this trait needs (raw images: positioned I/O on the
    /// file, nothing of ours to update; qcow2 disks, [`Qcow2Disk`]: the same on
    /// clusters already allocated, the rest under the image's own lock). None when every
    /// request needs that access (a bare [`Qcow2`]). Whatever it returns stays this
    /// disk's: flush, discard and the others still go through the backend, and see its
    /// writes.
    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        None
    }
}

/// Positioned reads and writes of a disk that several threads issue at once (see
/// [`BlockBackend::shared_io`]): each request as the backend's method of the same name.
pub trait SharedIo: Send + Sync + fmt::Debug {
    /// As [`BlockBackend::read_vectored_at`].
    fn read_vectored_at(
        &self,
        offset: u64,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Result<(), BlockError>;
    /// As [`BlockBackend::try_read_vectored_at`].
    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [io::IoSliceMut<'_>]) -> bool;
    /// As [`BlockBackend::write_vectored_at`].
    fn write_vectored_at(&self, offset: u64, bufs: &[io::IoSlice<'_>]) -> Result<(), BlockError>;
    /// [`SharedIo::write_vectored_at`] only if it is one positioned write into the host
    /// file, decided without waiting (as [`BlockBackend::writes_in_place`], per request:
    /// a qcow2 write to clusters it has allocated, not one that allocates). None when
    /// the caller must do the full write; nothing was written then.
    fn try_write_vectored_at(
        &self,
        offset: u64,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Result<(), BlockError>>;
}

impl<T: BlockBackend + ?Sized> BlockBackend for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        (**self).write_at(offset, buf)
    }
    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Result<(), BlockError> {
        (**self).read_vectored_at(offset, bufs)
    }
    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [io::IoSliceMut<'_>]) -> bool {
        (**self).try_read_vectored_at(offset, bufs)
    }
    fn writes_in_place(&self) -> bool {
        (**self).writes_in_place()
    }
    fn write_vectored_at(
        &mut self,
        offset: u64,
        bufs: &[io::IoSlice<'_>],
    ) -> Result<(), BlockError> {
        (**self).write_vectored_at(offset, bufs)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).write_zeroes(offset, len)
    }
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError> {
        (**self).block_status(offset, len)
    }
    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        (**self).shared_io()
    }
}

/// Writes `len` zero bytes at `offset` in bounded chunks.
pub(crate) fn write_zero_bytes<B: BlockBackend + ?Sized>(
    b: &mut B,
    offset: u64,
    len: u64,
) -> Result<(), BlockError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        b.write_at(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Image file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// A format name this crate does not handle.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown image format {0:?} (supported: raw, qcow2)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(UnknownFormat(s.to_owned())),
        }
    }
}

/// Why an image could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("opening {path}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("probing the format of {path}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("opening raw image {path}")]
    Raw { path: PathBuf, source: BlockError },
    #[error("opening qcow2 image {path}")]
    Qcow2 { path: PathBuf, source: Qcow2Error },
    #[error("backing file of {path}: {source}")]
    BackingFormat {
        path: PathBuf,
        source: UnknownFormat,
    },
    #[error("backing chain of {path} is longer than {MAX_BACKING_CHAIN} images")]
    ChainTooDeep { path: PathBuf },
    #[error("backing chain loops: {path} is its own ancestor")]
    ChainLoop { path: PathBuf },
    #[error("image {path} is in use")]
    Locked {
        path: PathBuf,
        source: lock::LockError,
    },
    #[error(
        "{path} starts with a qcow2 header but no format was given: formats are never guessed \
         for guest disks; give format=qcow2 to use it as qcow2, or format=raw to give the \
         guest its bytes"
    )]
    FormatNotGiven { path: PathBuf },
    #[error(
        "{path} names backing file {backing:?} without its format; guest disks need it \
         recorded (qemu-img rebase -u -F raw|qcow2 -b BACKING IMAGE)"
    )]
    BackingFormatMissing { path: PathBuf, backing: String },
    /// Files handed over for a disk ([`open_guest_disk_files`]) are not the chain its
    /// headers now name.
    #[error("{path}: the image's chain is not the one that was checked and handed over ({what})")]
    ChainChanged { path: PathBuf, what: String },
    /// A file of a chain confined to a folder ([`open_guest_disk_in`]) is not a regular
    /// file in it, reached without links.
    #[error("{0}")]
    Folder(#[from] FolderError),
    #[error("opening backing file {backing} of {path}")]
    Backing {
        path: PathBuf,
        backing: PathBuf,
        source: Box<OpenError>,
    },
}

/// Reads the start of a file and says whether it is qcow2 (by magic) or raw.
pub fn probe(path: &Path) -> Result<Format, OpenError> {
    let f = File::open(path).map_err(|source| OpenError::OpenFile {
        path: path.into(),
        source,
    })?;
    probe_storage(&f).map_err(|source| OpenError::Probe {
        path: path.into(),
        source,
    })
}

fn probe_storage(f: &dyn Storage) -> io::Result<Format> {
    if f.file_len()? < 4 {
        return Ok(Format::Raw);
    }
    let mut m = [0u8; 4];
    f.read_at(0, &mut m)?;
    Ok(if u32::from_be_bytes(m) == qcow2::header::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens an image and, for qcow2, its whole backing chain (read-only).
///
/// `format: None` probes (see the crate docs for why callers should prefer to pass it).
///
/// Every image of the chain is locked the way QEMU locks images (see [`lock`]): opening
/// fails with [`OpenError::Locked`] while another process writes it, or reads it without
/// sharing write access; the locks last until the backend is dropped.
pub fn open(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_with(path, format, read_only, false)
}

/// [`open`]; with `force_share` no locks are checked or taken (`qemu-img -U`), which is
/// only safe for reading an image nobody writes meanwhile.
pub fn open_with(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    force_share: bool,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_top(
        path,
        format,
        read_only,
        Policy {
            force_share,
            guest: false,
            folder: None,
        },
    )
}

/// Opens a disk a guest will read and write: the format is never guessed from content.
///
/// - `Some(format)`: opened as that format; a raw image's content is never interpreted.
/// - `None` (the user gave no format): opened as raw; a file that starts with the qcow2
///   magic is refused ([`OpenError::FormatNotGiven`]) rather than shown to the guest as
///   raw bytes or opened as qcow2, so the user says which was meant.
///
/// In a qcow2 chain every backing file must have its format recorded in the image naming
/// it ([`OpenError::BackingFormatMissing`] otherwise): a backing file is never probed
/// either, since another guest may write it.
pub fn open_guest_disk(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_guest_disk_with(path, format, read_only, false)
}

/// [`open_guest_disk`] with [`open_with`]'s `force_share`: for reading a guest's disk
/// from outside (a volume download) with the same rules.
pub fn open_guest_disk_with(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    force_share: bool,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_top(
        path,
        format,
        read_only,
        Policy {
            force_share,
            guest: true,
            folder: None,
        },
    )
}

/// [`open_guest_disk_with`] for a disk whose image and whole backing chain must lie in
/// `folder` (a pool's): each file is opened beneath it, without following links, and must
/// be a regular file ([`Folder`]), so a backing file naming `/etc/shadow`, `../x`, or a
/// link to either is refused ([`OpenError::Folder`]) and never opened. What is opened is
/// what is used: nothing is opened again by path.
pub fn open_guest_disk_in(
    folder: &Folder,
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    force_share: bool,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_top(
        path,
        format,
        read_only,
        Policy {
            force_share,
            guest: true,
            folder: Some(folder),
        },
    )
}

/// Opens the top image at `path` and its chain under `policy`.
fn open_top(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    policy: Policy<'_>,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    open_chain(path, format, read_only, policy, 0, &mut HashSet::new())
}

/// How [`open_chain`] treats locks, missing formats and where files may be.
#[derive(Clone, Copy)]
struct Policy<'a> {
    force_share: bool,
    /// Never probe (see [`open_guest_disk`]).
    guest: bool,
    /// Every file of the chain is opened beneath this folder ([`open_guest_disk_in`]).
    folder: Option<&'a Folder>,
}

/// Opens one file of a chain as `policy` says: beneath its folder, or by path.
fn open_image_file(path: &Path, read_only: bool, policy: Policy<'_>) -> Result<File, OpenError> {
    match policy.folder {
        Some(folder) => Ok(folder.open_file(path, read_only)?),
        None => OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| OpenError::OpenFile {
                path: path.into(),
                source,
            }),
    }
}

/// The identity of an open file (device and inode), for finding loops in a chain
/// without resolving its paths again.
fn file_id(file: &File, path: &Path) -> Result<(u64, u64), OpenError> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().map_err(|source| OpenError::OpenFile {
        path: path.into(),
        source,
    })?;
    Ok((m.dev(), m.ino()))
}

fn open_chain(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    policy: Policy<'_>,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    let force_share = policy.force_share;
    if depth > MAX_BACKING_CHAIN {
        return Err(OpenError::ChainTooDeep { path: path.into() });
    }
    let file = open_image_file(path, read_only, policy)?;
    if !seen.insert(file_id(&file, path)?) {
        return Err(OpenError::ChainLoop { path: path.into() });
    }
    if !force_share {
        lock::lock_image(&file, !read_only).map_err(|source| OpenError::Locked {
            path: path.into(),
            source,
        })?;
    }
    let format = match format {
        Some(f) => f,
        None if policy.guest => {
            // Probed only to refuse: the content never chooses how the guest sees it.
            let f = probe_storage(&file).map_err(|source| OpenError::Probe {
                path: path.into(),
                source,
            })?;
            if f != Format::Raw {
                return Err(OpenError::FormatNotGiven { path: path.into() });
            }
            Format::Raw
        }
        None => {
            let f = probe_storage(&file).map_err(|source| OpenError::Probe {
                path: path.into(),
                source,
            })?;
            if f == Format::Raw {
                warn!(path = %path.display(), "format not given; probed as raw");
            }
            f
        }
    };
    debug!(path = %path.display(), %format, read_only, depth, "block: opening");
    match format {
        Format::Raw => Ok(Box::new(Raw::new(Box::new(file), read_only).map_err(
            |source| OpenError::Raw {
                path: path.into(),
                source,
            },
        )?)),
        Format::Qcow2 => {
            let mut q =
                Qcow2::open(Box::new(file), read_only).map_err(|source| OpenError::Qcow2 {
                    path: path.into(),
                    source,
                })?;
            if let Some(name) = q.header().backing_file.clone() {
                let bpath = resolve_backing(path, &name);
                let bfmt = match q.header().backing_format.as_deref() {
                    Some(s) => Some(s.parse().map_err(|source| OpenError::BackingFormat {
                        path: path.into(),
                        source,
                    })?),
                    None if policy.guest => {
                        return Err(OpenError::BackingFormatMissing {
                            path: path.into(),
                            backing: name,
                        })
                    }
                    None => None,
                };
                let b = open_chain(&bpath, bfmt, true, policy, depth + 1, seen).map_err(
                    |e| match e {
                        e @ (OpenError::ChainLoop { .. } | OpenError::ChainTooDeep { .. }) => e,
                        e => OpenError::Backing {
                            path: path.into(),
                            backing: bpath.clone(),
                            source: Box::new(e),
                        },
                    },
                )?;
                q.set_backing(b);
            }
            Ok(Box::new(Qcow2Disk::new(q)))
        }
    }
}

/// The files a guest disk opened with [`open_guest_disk`] consists of: `path`, then each
/// backing file of its qcow2 chain, as that open names them (for a jail that must hold
/// exactly these). Opened read-only without locks, only to read the headers; a chain the
/// guest open would refuse is listed as far as it goes (the open then reports why).
pub fn guest_disk_files(path: &Path, format: Option<Format>) -> Vec<PathBuf> {
    chain_files(None, path, format)
}

/// [`guest_disk_files`] of a disk opened with [`open_guest_disk_in`]: the chain as far
/// as it stays a chain of regular files in `folder`.
pub fn guest_disk_files_in(folder: &Folder, path: &Path, format: Option<Format>) -> Vec<PathBuf> {
    chain_files(Some(folder), path, format)
}

fn chain_files(folder: Option<&Folder>, path: &Path, format: Option<Format>) -> Vec<PathBuf> {
    let policy = Policy {
        force_share: true,
        guest: true,
        folder,
    };
    if folder.is_some() && open_image_file(path, true, policy).is_err() {
        return Vec::new();
    }
    let mut files = vec![path.to_path_buf()];
    let (mut cur, mut fmt) = (path.to_path_buf(), format);
    while fmt == Some(Format::Qcow2) && files.len() <= MAX_BACKING_CHAIN {
        let Ok(file) = open_image_file(&cur, true, policy) else {
            break;
        };
        let Ok(q) = Qcow2::open(Box::new(file), true) else {
            break;
        };
        let Some(name) = q.header().backing_file.clone() else {
            break;
        };
        let next = resolve_backing(&cur, &name);
        fmt = q
            .header()
            .backing_format
            .as_deref()
            .and_then(|s| s.parse().ok());
        if files.contains(&next)
            || (folder.is_some() && open_image_file(&next, true, policy).is_err())
        {
            break;
        }
        files.push(next.clone());
        cur = next;
    }
    files
}

/// The chain of a guest disk as [`open_guest_disk`] would open it by path: the image, then
/// each backing file with the format recorded in the image naming it. Only qcow2 headers
/// are read (a raw image's content never is), read-only, without locks, and each file is
/// opened with `O_NONBLOCK` so a FIFO cannot stall the caller. Fails where that open
/// would (a qcow2 header on an image given no format, a backing file without a recorded
/// format, a loop, a chain too deep). For a manager that records a chain when a disk is
/// defined and refuses another at each start.
pub fn guest_disk_chain(
    path: &Path,
    format: Option<Format>,
) -> Result<Vec<(PathBuf, Format)>, OpenError> {
    let chain = open_guest_disk_chain(path, format, true)?;
    Ok(chain.into_iter().map(|c| (c.path, c.format)).collect())
}

/// A backing file name relative to the directory of the image naming it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.into();
    }
    image.parent().map_or_else(|| p.into(), |d| d.join(p))
}
