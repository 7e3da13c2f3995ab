//! Image operations for the CLI and the storage manager: create, info, convert, check,
//! resize. Each has its own error type naming the step that failed.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;
use tracing::info as log_info;

use crate::error::{BlockError, Qcow2Error};
use crate::qcow2::header::{self, Header, HeaderError};
use crate::qcow2::Qcow2;
use crate::storage::Storage;
use crate::{open, probe, resolve_backing, BlockStatus, Folder, FolderError, Format, OpenError};

pub use crate::qcow2::check::CheckReport as Qcow2CheckReport;

/// Cluster size `qemu-img create -f qcow2` uses.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Backing file name as it is stored in the image (relative names are resolved against
    /// the new image's directory), and its format (probed when `None`).
    pub backing: Option<(String, Option<Format>)>,
    /// qcow2 cluster size (power of two, 512 B ..= 2 MiB); default 64 KiB.
    pub cluster_size: Option<u64>,
}

#[derive(Debug, Error)]
pub enum CreateError {
    #[error("image {path} is in use")]
    Locked {
        path: PathBuf,
        source: crate::lock::LockError,
    },
    #[error("a backing file needs the qcow2 format")]
    BackingNeedsQcow2,
    #[error("no size given and no backing file to take it from")]
    NoSize,
    #[error("cluster size {0} is not a power of two between 512 and 2 MiB")]
    ClusterSize(u64),
    #[error(
        "backing file name is too long (max {} bytes)",
        header::MAX_BACKING_NAME
    )]
    BackingNameTooLong,
    #[error("opening the backing file")]
    OpenBacking(#[source] OpenError),
    #[error("{0}")]
    InFolder(#[source] FolderError),
    #[error("creating {path}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("writing the new image {path}")]
    WriteImage { path: PathBuf, source: io::Error },
    #[error("setting up the qcow2 image {path}")]
    InitQcow2 { path: PathBuf, source: Qcow2Error },
}

/// Creates an image (overwriting `path`), as `qemu-img create` does.
pub fn create(
    path: &Path,
    format: Format,
    size: Option<u64>,
    backing: Option<(&str, Option<Format>)>,
) -> Result<(), CreateError> {
    create_with(
        path,
        &CreateOptions {
            format,
            size,
            backing: backing.map(|(n, f)| (n.to_owned(), f)),
            cluster_size: None,
        },
    )
}

/// [`create`] with every option.
pub fn create_with(path: &Path, opts: &CreateOptions) -> Result<(), CreateError> {
    let (size, backing_format) = sizes(path, opts, &mut |bpath, fmt| {
        let bfmt = match fmt {
            Some(f) => f,
            None => probe(bpath)?,
        };
        Ok((open(bpath, Some(bfmt), true)?, bfmt))
    })?;
    let cfile = |source| CreateError::CreateFile {
        path: path.into(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(cfile)?;
    fill(file, path, opts, size, backing_format)
}

/// [`create_with`] for a new file in `folder` (a pool's): the file must not exist yet
/// (no entry of its name, a dangling link included, which would otherwise be followed),
/// and its backing file, whose format must be given, is opened beneath the folder as a
/// guest disk's is ([`crate::open_guest_disk_in`]).
pub fn create_in(folder: &Folder, path: &Path, opts: &CreateOptions) -> Result<(), CreateError> {
    let (size, backing_format) = sizes(path, opts, &mut |bpath, fmt| {
        let Some(bfmt) = fmt else {
            return Err(OpenError::BackingFormatMissing {
                path: path.into(),
                backing: bpath.display().to_string(),
            });
        };
        Ok((
            crate::open_guest_disk_in(folder, bpath, Some(bfmt), true, false)?,
            bfmt,
        ))
    })?;
    let file = folder.create_file(path).map_err(CreateError::InFolder)?;
    fill(file, path, opts, size, backing_format)
}

/// The new image's size and its backing file's format, from the options and the backing
/// file (opened with `open_backing`).
#[allow(clippy::type_complexity)]
fn sizes(
    path: &Path,
    opts: &CreateOptions,
    open_backing: &mut dyn FnMut(
        &Path,
        Option<Format>,
    ) -> Result<(Box<dyn crate::BlockBackend>, Format), OpenError>,
) -> Result<(u64, Option<Format>), CreateError> {
    let mut size = opts.size;
    let mut backing_format = None;
    if let Some((name, fmt)) = &opts.backing {
        if opts.format != Format::Qcow2 {
            return Err(CreateError::BackingNeedsQcow2);
        }
        if name.len() > header::MAX_BACKING_NAME as usize || name.is_empty() {
            return Err(CreateError::BackingNameTooLong);
        }
        let bpath = resolve_backing(path, name);
        let (b, bfmt) = open_backing(&bpath, *fmt).map_err(CreateError::OpenBacking)?;
        size = size.or(Some(b.size()));
        backing_format = Some(bfmt);
    }
    Ok((size.ok_or(CreateError::NoSize)?, backing_format))
}

/// Writes a new image of `size` into `file` (just opened for it).
fn fill(
    file: File,
    path: &Path,
    opts: &CreateOptions,
    size: u64,
    backing_format: Option<Format>,
) -> Result<(), CreateError> {
    let cfile = |source| CreateError::CreateFile {
        path: path.into(),
        source,
    };
    // Lock before truncating, so an image another process uses is left alone.
    crate::lock::lock_image(&file, true).map_err(|source| CreateError::Locked {
        path: path.into(),
        source,
    })?;
    file.set_len(0).map_err(cfile)?;
    match opts.format {
        Format::Raw => {
            file.set_len(size).map_err(cfile)?;
            file.sync_all().map_err(cfile)?;
        }
        Format::Qcow2 => {
            let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
            if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
                return Err(CreateError::ClusterSize(cs));
            }
            let name = opts.backing.as_ref().map(|(n, _)| n.clone());
            write_empty_qcow2(&file, cs, name, backing_format).map_err(|source| {
                CreateError::WriteImage {
                    path: path.into(),
                    source,
                }
            })?;
            let init = |source| CreateError::InitQcow2 {
                path: path.into(),
                source,
            };
            let mut q = Qcow2::open(Box::new(file), false).map_err(init)?;
            // Rounded up to a sector; a size that overflows doing so is too large.
            let sectors = size
                .checked_next_multiple_of(512)
                .ok_or(Qcow2Error::SizeTooLarge(size))
                .map_err(init)?;
            q.resize(sectors).map_err(init)?;
        }
    }
    log_info!(path = %path.display(), format = %opts.format, size, "image created");
    Ok(())
}

/// Writes a zero-sized qcow2 v3: header, refcount table and one refcount block.
fn write_empty_qcow2(
    f: &File,
    cs: u64,
    backing: Option<String>,
    backing_format: Option<Format>,
) -> io::Result<()> {
    let cluster_bits = cs.trailing_zeros();
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: header::V3_HEADER_LEN,
        compression_type: 0,
        backing_file: None,
        backing_format: backing_format.map(|f| f.to_string()),
    };
    let mut cluster0 = h.encode();
    if let Some(name) = &backing {
        h.backing_file_offset = cluster0.len() as u64;
        h.backing_file_size = name.len() as u32;
        cluster0 = h.encode();
        cluster0.extend_from_slice(name.as_bytes());
    }
    if cluster0.len() as u64 > cs {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "header does not fit a cluster",
        ));
    }
    cluster0.resize(cs as usize, 0);
    let mut reftable = vec![0u8; cs as usize];
    reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut refblock = vec![0u8; cs as usize];
    for i in 0..3 {
        refblock[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Storage::write_at(f, 0, &cluster0)?;
    Storage::write_at(f, cs, &reftable)?;
    Storage::write_at(f, 2 * cs, &refblock)?;
    f.sync_all()
}

/// What `info` reports about an image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub actual_size: u64,
    pub cluster_size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// qcow2 version ("compat" in qemu-img: 2 = 0.10, 3 = 1.1).
    pub qcow2_version: Option<u32>,
    pub refcount_bits: Option<u32>,
    pub dirty: bool,
    pub corrupt: bool,
}

#[derive(Debug, Error)]
pub enum InfoError {
    #[error(transparent)]
    Probe(#[from] OpenError),
    #[error("reading {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("reading the qcow2 header of {path}")]
    Header { path: PathBuf, source: HeaderError },
    #[error(
        "backing chain of {path} is longer than {} images",
        crate::MAX_BACKING_CHAIN
    )]
    ChainTooDeep { path: PathBuf },
    #[error("backing chain loops: {path} is its own ancestor")]
    ChainLoop { path: PathBuf },
    #[error("backing file of {path}: {source}")]
    BackingFormat {
        path: PathBuf,
        source: crate::UnknownFormat,
    },
}

/// Describes an image from its header, without opening its backing chain.
pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo, InfoError> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let f = File::open(path).map_err(|source| InfoError::Read {
        path: path.into(),
        source,
    })?;
    info_of(f, path, format)
}

/// [`info`] of an image in `folder` ([`Folder::open_file`]: a regular file reached
/// without links), with its format given.
pub fn info_in(folder: &Folder, path: &Path, format: Format) -> Result<ImageInfo, InfoError> {
    let f = folder
        .open_file(path, true)
        .map_err(|e| InfoError::Probe(e.into()))?;
    info_of(f, path, format)
}

fn info_of(f: File, path: &Path, format: Format) -> Result<ImageInfo, InfoError> {
    let rd = |source| InfoError::Read {
        path: path.into(),
        source,
    };
    let len = Storage::file_len(&f).map_err(rd)?;
    let actual_size = f.allocated_bytes().map_err(rd)?;
    let mut out = ImageInfo {
        filename: path.into(),
        format,
        virtual_size: len,
        actual_size,
        cluster_size: None,
        backing_file: None,
        backing_format: None,
        qcow2_version: None,
        refcount_bits: None,
        dirty: false,
        corrupt: false,
    };
    if format == Format::Qcow2 {
        let mut buf = vec![0u8; (len.min(2 << 20)) as usize];
        Storage::read_at(&f, 0, &mut buf).map_err(rd)?;
        let h = Header::parse(&buf).map_err(|source| InfoError::Header {
            path: path.into(),
            source,
        })?;
        out.virtual_size = h.size;
        out.cluster_size = Some(h.cluster_size());
        out.backing_file = h.backing_file.clone();
        out.backing_format = h.backing_format.clone();
        out.qcow2_version = Some(h.version);
        out.refcount_bits = Some(1 << h.refcount_order);
        out.dirty = h.incompatible_features & header::INCOMPAT_DIRTY != 0;
        out.corrupt = h.incompatible_features & header::INCOMPAT_CORRUPT != 0;
    }
    Ok(out)
}

/// [`info`] for an image and each image of its backing chain, top first (like
/// `qemu-img info --backing-chain`). Loops and chains longer than
/// [`crate::MAX_BACKING_CHAIN`] are errors.
pub fn info_chain(path: &Path, format: Option<Format>) -> Result<Vec<ImageInfo>, InfoError> {
    let mut out: Vec<ImageInfo> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, f)) = next.take() {
        if out.len() > crate::MAX_BACKING_CHAIN {
            return Err(InfoError::ChainTooDeep { path: path.into() });
        }
        let canon = p.canonicalize().map_err(|source| InfoError::Read {
            path: p.clone(),
            source,
        })?;
        if !seen.insert(canon) {
            return Err(InfoError::ChainLoop { path: p });
        }
        let i = info(&p, f)?;
        if let Some(b) = &i.backing_file {
            let bfmt = match i.backing_format.as_deref() {
                Some(s) => Some(s.parse().map_err(|source| InfoError::BackingFormat {
                    path: p.clone(),
                    source,
                })?),
                None => None,
            };
            next = Some((resolve_backing(&p, b), bfmt));
        }
        out.push(i);
    }
    Ok(out)
}

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("convert cannot create the destination on a backing file")]
    BackingUnsupported,
    #[error("opening the source image")]
    OpenSource(#[source] OpenError),
    #[error("creating the destination image")]
    CreateDestination(#[source] CreateError),
    #[error("opening the destination image")]
    OpenDestination(#[source] OpenError),
    #[error("reading the source at {offset:#x}")]
    Read { offset: u64, source: BlockError },
    #[error("writing the destination at {offset:#x}")]
    Write { offset: u64, source: BlockError },
    #[error("flushing the destination")]
    Flush(#[source] BlockError),
}

/// Copies the guest-visible content of `src` into a new image `dst`, skipping ranges that
/// are unallocated or read as zeros. `progress(done, total)` is called as bytes are done.
pub fn convert(
    src: &Path,
    src_format: Option<Format>,
    dst: &Path,
    dst_format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    let opts = CreateOptions {
        format: dst_format,
        size: None,
        backing: None,
        cluster_size: None,
    };
    convert_with(src, src_format, dst, &opts, progress)
}

/// [`convert`] creating the destination with `dst` options (format, cluster size). Its
/// size is always the source's; a backing file in the options is refused.
pub fn convert_with(
    src: &Path,
    src_format: Option<Format>,
    dst: &Path,
    dst_opts: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    if dst_opts.backing.is_some() {
        return Err(ConvertError::BackingUnsupported);
    }
    let s = open(src, src_format, true).map_err(ConvertError::OpenSource)?;
    convert_from(s, None, dst, dst_opts, progress)
}

/// [`convert_with`] from an image already open (for example with
/// [`crate::open_guest_disk_in`]); with `folder`, the destination is a new file made in
/// it ([`create_in`]).
pub fn convert_from(
    mut s: Box<dyn crate::BlockBackend>,
    folder: Option<&Folder>,
    dst: &Path,
    dst_opts: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    const CHUNK: u64 = 1 << 20;
    if dst_opts.backing.is_some() {
        return Err(ConvertError::BackingUnsupported);
    }
    let size = s.size();
    let opts = CreateOptions {
        size: Some(size),
        ..dst_opts.clone()
    };
    let mut d = match folder {
        Some(folder) => {
            create_in(folder, dst, &opts).map_err(ConvertError::CreateDestination)?;
            crate::open_guest_disk_in(folder, dst, Some(opts.format), false, false)
        }
        None => {
            create_with(dst, &opts).map_err(ConvertError::CreateDestination)?;
            open(dst, Some(opts.format), false)
        }
    }
    .map_err(ConvertError::OpenDestination)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    progress(0, size);
    while pos < size {
        let want = CHUNK.min(size - pos);
        let (status, n) = s
            .block_status(pos, want)
            .map_err(|source| ConvertError::Read {
                offset: pos,
                source,
            })?;
        let n = n.clamp(1, want);
        if status == BlockStatus::Data {
            let chunk = &mut buf[..n as usize];
            s.read_at(pos, chunk).map_err(|source| ConvertError::Read {
                offset: pos,
                source,
            })?;
            write_nonzero(d.as_mut(), pos, chunk).map_err(|source| ConvertError::Write {
                offset: pos,
                source,
            })?;
        }
        pos += n;
        progress(pos, size);
    }
    d.flush().map_err(ConvertError::Flush)?;
    Ok(())
}

/// Writes `data` at `offset`, skipping 64 KiB-aligned pieces that are all zeros (the new
/// destination already reads zeros there).
fn write_nonzero(
    d: &mut dyn crate::BlockBackend,
    offset: u64,
    data: &[u8],
) -> Result<(), BlockError> {
    const PIECE: usize = 64 << 10;
    let mut start = None;
    let mut i = 0;
    while i < data.len() {
        let piece_end = (i + PIECE - ((offset as usize + i) % PIECE)).min(data.len());
        let zero = data[i..piece_end].iter().all(|&b| b == 0);
        match (zero, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                d.write_at(offset + s as u64, &data[s..i])?;
                start = None;
            }
            _ => {}
        }
        i = piece_end;
    }
    if let Some(s) = start {
        d.write_at(offset + s as u64, &data[s..])?;
    }
    Ok(())
}

/// Result of [`check`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub filename: PathBuf,
    pub format: Format,
    /// `None` for formats without metadata to check (raw).
    #[serde(flatten)]
    pub qcow2: Option<Qcow2CheckReport>,
}

impl CheckReport {
    /// True when no corruption was found (leaks are allowed).
    pub fn is_consistent(&self) -> bool {
        self.qcow2.as_ref().is_none_or(|r| r.is_consistent())
    }
}

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("image {path} is in use")]
    Locked {
        path: PathBuf,
        source: crate::lock::LockError,
    },
    #[error(transparent)]
    Probe(#[from] OpenError),
    #[error("opening {path}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("opening qcow2 image {path}")]
    Open { path: PathBuf, source: Qcow2Error },
    #[error("walking the metadata of {path}")]
    Walk { path: PathBuf, source: Qcow2Error },
}

/// Checks an image's metadata (qcow2); raw images have none and always pass.
pub fn check(path: &Path, format: Option<Format>) -> Result<CheckReport, CheckError> {
    check_with(path, format, false)
}

/// [`check`], optionally repairing leaked clusters (`qemu-img check -r leaks`), which opens
/// the image read-write. Corruptions are reported, never repaired.
pub fn check_with(
    path: &Path,
    format: Option<Format>,
    repair_leaks: bool,
) -> Result<CheckReport, CheckError> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let mut report = CheckReport {
        filename: path.into(),
        format,
        qcow2: None,
    };
    if format == Format::Qcow2 {
        let f = OpenOptions::new()
            .read(true)
            .write(repair_leaks)
            .open(path)
            .map_err(|source| CheckError::OpenFile {
                path: path.into(),
                source,
            })?;
        crate::lock::lock_image(&f, repair_leaks).map_err(|source| CheckError::Locked {
            path: path.into(),
            source,
        })?;
        // Opened with the read-only rules (an image with internal snapshots is checked and
        // repaired too); a repair only lowers the refcounts of leaked clusters.
        let mut q = Qcow2::open(Box::new(f), true).map_err(|source| CheckError::Open {
            path: path.into(),
            source,
        })?;
        if repair_leaks {
            q.allow_refcount_repair();
        }
        report.qcow2 = Some(crate::qcow2::check::check(&mut q, repair_leaks).map_err(
            |source| CheckError::Walk {
                path: path.into(),
                source,
            },
        )?);
    }
    Ok(report)
}

#[derive(Debug, Error)]
pub enum ResizeError {
    #[error("image {path} is in use")]
    Locked {
        path: PathBuf,
        source: crate::lock::LockError,
    },
    #[error(transparent)]
    Probe(#[from] OpenError),
    #[error("opening {path}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("new size {new} is smaller than current size {old}: shrinking is not supported")]
    Shrink { old: u64, new: u64 },
    #[error("resizing raw image {path}")]
    Raw { path: PathBuf, source: io::Error },
    #[error("resizing qcow2 image {path}")]
    Qcow2 { path: PathBuf, source: Qcow2Error },
}

/// Grows an image's virtual size to `new_size` (qcow2 sizes round up to 512 bytes).
pub fn resize(path: &Path, format: Option<Format>, new_size: u64) -> Result<(), ResizeError> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ResizeError::OpenFile {
            path: path.into(),
            source,
        })?;
    resize_file(f, path, format, new_size)
}

/// [`resize`] of an image in `folder` ([`Folder::open_file`]), with its format given.
pub fn resize_in(
    folder: &Folder,
    path: &Path,
    format: Format,
    new_size: u64,
) -> Result<(), ResizeError> {
    let f = folder
        .open_file(path, false)
        .map_err(|e| ResizeError::Probe(e.into()))?;
    resize_file(f, path, format, new_size)
}

fn resize_file(f: File, path: &Path, format: Format, new_size: u64) -> Result<(), ResizeError> {
    crate::lock::lock_image(&f, true).map_err(|source| ResizeError::Locked {
        path: path.into(),
        source,
    })?;
    match format {
        Format::Raw => {
            let raw = |source| ResizeError::Raw {
                path: path.into(),
                source,
            };
            let old = f.metadata().map_err(raw)?.len();
            if new_size < old {
                return Err(ResizeError::Shrink { old, new: new_size });
            }
            f.set_len(new_size).map_err(raw)?;
            f.sync_all().map_err(raw)?;
        }
        Format::Qcow2 => {
            let q2 = |source| ResizeError::Qcow2 {
                path: path.into(),
                source,
            };
            let mut q = Qcow2::open(Box::new(f), false).map_err(q2)?;
            let old = q.header().size;
            if new_size < old {
                return Err(ResizeError::Shrink { old, new: new_size });
            }
            q.resize(new_size.div_ceil(512) * 512).map_err(q2)?;
        }
    }
    log_info!(path = %path.display(), new_size, "image resized");
    Ok(())
}
