//! Raw image files: guest offset = file offset.
//!
//! Reads and writes are positioned I/O on the file and nothing else, so they need no
//! lock: the file and its state live in a [`RawFile`] that [`BlockBackend::shared_io`]
//! hands to every thread serving the disk.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::BlockError;
use crate::storage::Storage;
use crate::{BlockBackend, BlockStatus, SharedIo};

/// A raw disk image; its size is the file's length at open.
#[derive(Debug)]
pub struct Raw {
    io: Arc<RawFile>,
}

/// The file of a raw image, read and written by several threads at once.
#[derive(Debug)]
pub struct RawFile {
    file: Box<dyn Storage>,
    size: u64,
    read_only: bool,
    /// A request changed the file since the last flush. Set before each write, cleared
    /// by a flush before it syncs: a write that ends after the flush started stays
    /// marked for the next one.
    dirty: AtomicBool,
}

impl Raw {
    /// Wraps an open file.
    pub fn new(file: Box<dyn Storage>, read_only: bool) -> Result<Self, BlockError> {
        let size = file
            .file_len()
            .map_err(|source| BlockError::RawRead { offset: 0, source })?;
        Ok(Raw {
            io: Arc::new(RawFile {
                file,
                size,
                read_only,
                dirty: AtomicBool::new(false),
            }),
        })
    }
}

impl RawFile {
    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, len)?;
        self.dirty.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        self.file
            .write_at(offset, buf)
            .map_err(|source| BlockError::RawWrite { offset, source })
    }
}

impl SharedIo for RawFile {
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, len)?;
        self.file
            .read_vectored_at(offset, bufs)
            .map_err(|source| BlockError::RawRead { offset, source })
    }

    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, len).is_ok() && self.file.try_read_vectored_at(offset, bufs)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_write(offset, len)?;
        self.file
            .write_vectored_at(offset, bufs)
            .map_err(|source| BlockError::RawWrite { offset, source })
    }
    fn try_write_vectored_at(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> Option<Result<(), BlockError>> {
        Some(SharedIo::write_vectored_at(self, offset, bufs))
    }
}

impl BlockBackend for Raw {
    fn size(&self) -> u64 {
        self.io.size
    }

    fn read_only(&self) -> bool {
        self.io.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.io.check(offset, buf.len() as u64)?;
        self.io
            .file
            .read_at(offset, buf)
            .map_err(|source| BlockError::RawRead { offset, source })
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.io.write_at(offset, buf)
    }

    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<(), BlockError> {
        SharedIo::read_vectored_at(&*self.io, offset, bufs)
    }

    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        SharedIo::try_read_vectored_at(&*self.io, offset, bufs)
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        SharedIo::write_vectored_at(&*self.io, offset, bufs)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.io.dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.io.file.sync() {
                // Still not durable: the next flush tries again.
                self.io.dirty.store(true, Ordering::SeqCst);
                return Err(BlockError::RawFlush(e));
            }
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.io.check_write(offset, len)?;
        // Discard is advisory: a host without hole punching simply keeps the data.
        self.io
            .file
            .punch_hole(offset, len)
            .map(|_| ())
            .map_err(|source| BlockError::RawDiscard { offset, source })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.io.check_write(offset, len)?;
        let punched = self
            .io
            .file
            .punch_hole(offset, len)
            .map_err(|source| BlockError::RawDiscard { offset, source })?;
        if punched {
            return Ok(());
        }
        crate::write_zero_bytes(self, offset, len)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError> {
        self.io.check(offset, len)?;
        match self.io.file.extent(offset, len) {
            Ok(Some((true, n))) if n > 0 => Ok((BlockStatus::Data, n)),
            Ok(Some((false, n))) if n > 0 => Ok((BlockStatus::Zero, n)),
            _ => Ok((BlockStatus::Data, len)),
        }
    }

    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        Some(self.io.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// Threads writing and reading their own blocks through the shared path at once
    /// each read back what they wrote, and a flush after them finds the disk dirty.
    #[test]
    fn several_threads_read_and_write_their_blocks_at_once() {
        let mut raw = Raw::new(Box::new(MemStorage::new(vec![0; 64 << 10])), false).unwrap();
        let io = raw.shared_io().expect("a raw image shares its file");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let io = io.clone();
                s.spawn(move || {
                    for round in 0..200u32 {
                        let block = u64::from(t) * 4 + u64::from(round % 4);
                        let data = [t ^ round as u8; 4096];
                        io.write_vectored_at(block * 4096, &[IoSlice::new(&data)])
                            .unwrap();
                        let mut back = [0u8; 4096];
                        io.read_vectored_at(block * 4096, &mut [IoSliceMut::new(&mut back)])
                            .unwrap();
                        assert_eq!(back, data, "thread {t} round {round}");
                    }
                });
            }
        });
        assert!(raw.io.dirty.load(Ordering::SeqCst));
        raw.flush().unwrap();
        assert!(!raw.io.dirty.load(Ordering::SeqCst));
        // The backend's own reads see the shared path's writes: block 4 is thread 1's
        // first, last written in round 196.
        let mut b = [0u8; 1];
        raw.read_at(4096 * 4, &mut b).unwrap();
        assert_eq!(b[0], 1 ^ 196);
        // Range and read-only checks hold on the shared path too.
        let end = 64 << 10;
        assert!(matches!(
            io.write_vectored_at(end - 512, &[IoSlice::new(&[0; 1024])]),
            Err(BlockError::OutOfRange { .. })
        ));
        let ro = Raw::new(Box::new(MemStorage::new(vec![0; 4096])), true).unwrap();
        let ro_io = ro.shared_io().unwrap();
        assert!(matches!(
            ro_io.write_vectored_at(0, &[IoSlice::new(&[1; 512])]),
            Err(BlockError::ReadOnly)
        ));
    }
}
