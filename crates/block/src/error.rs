//! Errors of the I/O path. Each variant names the step that failed.

use std::io;

use thiserror::Error;

use crate::qcow2::header::HeaderError;

/// An error from a [`crate::BlockBackend`] request.
#[derive(Debug, Error)]
pub enum BlockError {
    #[error("request at {offset:#x} (+{len:#x}) lies past the end of the {size:#x}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is open read-only")]
    ReadOnly,
    #[error("reading raw image at {offset:#x}")]
    RawRead { offset: u64, source: io::Error },
    #[error("writing raw image at {offset:#x}")]
    RawWrite { offset: u64, source: io::Error },
    #[error("flushing raw image")]
    RawFlush(#[source] io::Error),
    #[error("discarding in raw image at {offset:#x}")]
    RawDiscard { offset: u64, source: io::Error },
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
}

/// An error inside the qcow2 driver.
#[derive(Debug, Error)]
pub enum Qcow2Error {
    #[error("reading the qcow2 header")]
    ReadHeader(#[source] io::Error),
    #[error("invalid qcow2 header")]
    InvalidHeader(#[from] HeaderError),
    #[error("writing the qcow2 header")]
    WriteHeader(#[source] io::Error),
    #[error("reading the L1 table")]
    ReadL1(#[source] io::Error),
    #[error("writing the L1 table")]
    WriteL1(#[source] io::Error),
    #[error("reading the L2 table at {offset:#x}")]
    ReadL2 { offset: u64, source: io::Error },
    #[error("writing the L2 table at {offset:#x}")]
    WriteL2 { offset: u64, source: io::Error },
    #[error("reading the refcount table")]
    ReadRefcountTable(#[source] io::Error),
    #[error("writing the refcount table")]
    WriteRefcountTable(#[source] io::Error),
    #[error("reading the refcount block at {offset:#x}")]
    ReadRefcountBlock { offset: u64, source: io::Error },
    #[error("writing the refcount block at {offset:#x}")]
    WriteRefcountBlock { offset: u64, source: io::Error },
    #[error("reading data cluster at {offset:#x}")]
    ReadData { offset: u64, source: io::Error },
    #[error("writing data cluster at {offset:#x}")]
    WriteData { offset: u64, source: io::Error },
    #[error("syncing the image file")]
    Sync(#[source] io::Error),
    #[error("reading the file length")]
    FileLength(#[source] io::Error),
    #[error("L1 entry {index} ({entry:#x}) is invalid: {why}")]
    InvalidL1Entry {
        index: u64,
        entry: u64,
        why: &'static str,
    },
    #[error("L2 entry for guest offset {guest:#x} ({entry:#x}) is invalid: {why}")]
    InvalidL2Entry {
        guest: u64,
        entry: u64,
        why: &'static str,
    },
    #[error("refcount table entry {index} ({entry:#x}) is invalid: {why}")]
    InvalidRefcountTableEntry {
        index: u64,
        entry: u64,
        why: &'static str,
    },
    #[error("refcount of cluster {cluster} would drop below zero: image is corrupt")]
    RefcountUnderflow { cluster: u64 },
    #[error("refcount of cluster {cluster} would overflow its {bits}-bit field")]
    RefcountOverflow { cluster: u64, bits: u32 },
    #[error("the refcount table cannot grow past its maximum size")]
    RefcountTableFull,
    #[error("no place for a refcount block covering cluster {cluster}")]
    RefcountBlockPlacement { cluster: u64 },
    #[error("the image would exceed the largest file size qcow2 can address")]
    ImageFull,
    #[error("compressed cluster at guest offset {guest:#x}: {why}")]
    Compressed { guest: u64, why: &'static str },
    #[error("image has the dirty bit set (lazy refcounts); repair it with `qemu-img check -r all` before writing")]
    DirtyImage,
    #[error("image is marked corrupt; repair it with `qemu-img check -r all` before writing")]
    CorruptImage,
    #[error("image has internal snapshots; writing to it is not supported")]
    HasSnapshots,
    #[error("new size {new} is smaller than current size {old}: shrinking is not supported")]
    Shrink { old: u64, new: u64 },
    #[error("virtual size {0} exceeds what this cluster size can address")]
    SizeTooLarge(u64),
    #[error("reading from the backing file")]
    Backing(#[source] Box<BlockError>),
}
