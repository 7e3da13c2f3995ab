//! Raw image files: guest offset = file offset.

use std::io::{IoSlice, IoSliceMut};

use crate::error::BlockError;
use crate::storage::Storage;
use crate::{BlockBackend, BlockStatus};

/// A raw disk image; its size is the file's length at open.
#[derive(Debug)]
pub struct Raw {
    file: Box<dyn Storage>,
    size: u64,
    read_only: bool,
    /// A request changed the file since the last flush.
    dirty: bool,
}

impl Raw {
    /// Wraps an open file.
    pub fn new(file: Box<dyn Storage>, read_only: bool) -> Result<Self, BlockError> {
        let size = file
            .file_len()
            .map_err(|source| BlockError::RawRead { offset: 0, source })?;
        Ok(Raw {
            file,
            size,
            read_only,
            dirty: false,
        })
    }

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

    fn check_write(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, len)?;
        self.dirty = true;
        Ok(())
    }
}

impl BlockBackend for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_at(offset, buf)
            .map_err(|source| BlockError::RawRead { offset, source })
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        self.file
            .write_at(offset, buf)
            .map_err(|source| BlockError::RawWrite { offset, source })
    }

    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<(), BlockError> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, len)?;
        self.file
            .read_vectored_at(offset, bufs)
            .map_err(|source| BlockError::RawRead { offset, source })
    }

    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, len).is_ok() && self.file.try_read_vectored_at(offset, bufs)
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_write(offset, len)?;
        self.file
            .write_vectored_at(offset, bufs)
            .map_err(|source| BlockError::RawWrite { offset, source })
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.dirty {
            self.file.sync().map_err(BlockError::RawFlush)?;
            self.dirty = false;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        // Discard is advisory: a host without hole punching simply keeps the data.
        self.file
            .punch_hole(offset, len)
            .map(|_| ())
            .map_err(|source| BlockError::RawDiscard { offset, source })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        let punched = self
            .file
            .punch_hole(offset, len)
            .map_err(|source| BlockError::RawDiscard { offset, source })?;
        if punched {
            return Ok(());
        }
        crate::write_zero_bytes(self, offset, len)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError> {
        self.check(offset, len)?;
        match self.file.extent(offset, len) {
            Ok(Some((true, n))) if n > 0 => Ok((BlockStatus::Data, n)),
            Ok(Some((false, n))) if n > 0 => Ok((BlockStatus::Zero, n)),
            _ => Ok((BlockStatus::Data, len)),
        }
    }
}
