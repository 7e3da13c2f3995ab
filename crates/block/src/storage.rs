//! The byte store under an image format: a host file, or (in tests) a wrapper around one.
//!
//! Formats talk to their file only through [`Storage`], so a test can put a fault-injecting
//! wrapper underneath a qcow2 image and simulate a crash after any number of writes.

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positioned I/O on the file that holds an image. Shared between threads: a raw disk's
/// requests from several queues run on it at once ([`crate::SharedIo`]).
pub trait Storage: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Fills each of `bufs` in turn from `offset` on, as [`Storage::read_at`] would.
    /// Files do it in one `preadv`, so a device can read straight into scattered guest
    /// buffers with one system call.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_at(at, b)?;
            at = at.checked_add(b.len() as u64).ok_or_else(overflow)?;
        }
        Ok(())
    }
    /// Writes each of `bufs` in turn from `offset` on, as [`Storage::write_at`] would
    /// (one `pwritev` for files).
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(at, b)?;
            at = at.checked_add(b.len() as u64).ok_or_else(overflow)?;
        }
        Ok(())
    }
    /// Fills `bufs` from `offset` on only if it can without waiting for the disk (the
    /// bytes are in the host's page cache): true when done, false when nothing useful
    /// happened and [`Storage::read_vectored_at`] must do it (it may have filled part of
    /// the buffers meanwhile). Never fails: a real error shows in that read.
    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        let _ = (offset, bufs);
        false
    }
    /// Makes every completed write durable (a write barrier).
    fn sync(&self) -> io::Result<()>;
    /// Current length of the file in bytes.
    fn file_len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range so it reads as zeros. Returns `Ok(false)` when the host cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Bytes the file occupies on the host disk.
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Whether `offset` lies in data (`true`) or a hole, and for how many bytes (at most
    /// `len`) that holds. `None` when the host cannot tell.
    fn extent(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        let _ = (offset, len);
        Ok(None)
    }
}

impl Storage for File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.checked_add(done as u64).ok_or_else(overflow)?;
            match FileExt::read_at(self, &mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        offset.checked_add(buf.len() as u64).ok_or_else(overflow)?;
        self.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        vectored(self, offset, &mut iov, Direction::Read)
    }

    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        // One call, all or nothing: the kernel takes at most IOV_MAX (1024) entries.
        if bufs.len() > 1024 {
            return false;
        }
        let Ok(pos) = libc::off_t::try_from(offset) else {
            return false;
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points at a buffer of `bufs`, borrowed mutably for this
        // call, with its length; the fd is open while `self` lives. RWF_NOWAIT makes
        // the call return EAGAIN (or a short count) rather than wait for the disk.
        let n = unsafe {
            libc::preadv2(
                self.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                pos,
                libc::RWF_NOWAIT,
            )
        };
        // A short count (part cached, or the end of the file) is left to the full read.
        usize::try_from(n).is_ok_and(|n| n == total && n > 0)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                // pwritev only reads through the pointer; the cast is what iovec's type asks.
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        vectored(self, offset, &mut iov, Direction::Write)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn file_len(&self) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        let meta = self.metadata()?;
        if meta.file_type().is_block_device() {
            // A block device's metadata length is 0; its end is its size. Moving the file
            // position is harmless: all I/O here is positioned.
            let mut f: &File = self;
            return f.seek(SeekFrom::End(0));
        }
        Ok(meta.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self` and
        // stays open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV | libc::ENOTTY) => {
                Ok(false)
            }
            _ => Err(err),
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.metadata()?.blocks().saturating_mul(512))
    }

    fn extent(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        let seek = |whence| {
            // SAFETY: lseek only moves the descriptor's file position, which nothing in this
            // crate relies on (all I/O is positioned: pread/pwrite); the fd stays open for
            // the call because `self` owns it.
            let r = unsafe { libc::lseek(self.as_raw_fd(), off, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(data) if data > offset => Ok(Some((false, (data - offset).min(len)))),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(hole) if hole > offset => Ok(Some((true, (hole - offset).min(len)))),
                _ => Ok(None),
            },
            // No data at or after `offset`: a hole up to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Some((false, len))),
            Err(_) => Ok(None),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// Runs preadv/pwritev over `iov` until every byte is done, carrying on after short
/// transfers and EINTR; a read that meets the end of the file zero-fills the rest.
/// `iov` must describe buffers the caller borrows (mutably for reads) for the call.
fn vectored(f: &File, offset: u64, iov: &mut [libc::iovec], dir: Direction) -> io::Result<()> {
    let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
    offset.checked_add(total).ok_or_else(overflow)?;
    // The kernel takes at most IOV_MAX (1024) entries per call.
    const IOV_MAX: usize = 1024;
    let mut at = offset;
    let mut first = 0usize;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let pos = libc::off_t::try_from(at).map_err(|_| overflow())?;
        let rest = &iov[first..];
        let cnt = rest.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: every iovec in `rest` points at a buffer the caller borrows for this
        // call (mutably for reads), with its length; the fd is open while `f` lives.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(f.as_raw_fd(), rest.as_ptr(), cnt, pos),
                Direction::Write => libc::pwritev(f.as_raw_fd(), rest.as_ptr(), cnt, pos),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        if n == 0 {
            if dir == Direction::Write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            // End of file: the rest reads as zeros.
            for v in &iov[first..] {
                // SAFETY: as above, the caller lends these buffers mutably for reads.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        at += n as u64;
        // Step over what was transferred: whole buffers, then part of one.
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                v.iov_len = 0;
                first += 1;
            } else {
                // SAFETY: `n` < iov_len, so the advanced pointer stays inside the buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn overflow() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset overflows u64")
}

/// An image held in memory: for tests, fuzzing and scratch images.
#[derive(Debug, Clone)]
pub struct MemStorage {
    data: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    limit: u64,
}

/// Files past this size are refused by [`MemStorage`] (keeps hostile offsets from
/// allocating memory).
const MEM_MAX: u64 = 1 << 30;

impl MemStorage {
    /// A store holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self::with_limit(bytes, MEM_MAX)
    }

    /// A store holding `bytes` that refuses to grow past `limit` bytes.
    pub fn with_limit(bytes: Vec<u8>, limit: u64) -> Self {
        MemStorage {
            data: std::sync::Arc::new(std::sync::Mutex::new(bytes)),
            limit,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemStorage {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.lock();
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < d.len() {
                let n = buf.len().min(d.len() - start);
                buf[..n].copy_from_slice(&d[start..start + n]);
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(overflow)?;
        if end > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory image too large",
            ));
        }
        let mut d = self.lock();
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory image too large",
            ));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut d = self.lock();
        let start = (offset as usize).min(d.len());
        let end = (offset.saturating_add(len) as usize).min(d.len());
        d[start..end].fill(0);
        Ok(true)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new, empty file at `path`, open for reading and writing.
    fn scratch_file(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_cached_read_is_served_without_waiting_and_a_short_one_is_not() {
        let path = std::env::temp_dir().join(format!("block-nowait-{}", std::process::id()));
        let f = scratch_file(&path);
        // Just written: in the page cache.
        f.write_all_at(&[5u8; 8192], 0).unwrap();
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 2048]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        assert!(Storage::try_read_vectored_at(&f, 1024, &mut bufs));
        assert!(a.iter().chain(&b).all(|&x| x == 5));
        // Past the end of the file: short, left to the full read (which zero-fills).
        let mut c = vec![0u8; 4096];
        assert!(!Storage::try_read_vectored_at(
            &f,
            6144,
            &mut [IoSliceMut::new(&mut c)]
        ));
        // Nothing to read is nothing served.
        assert!(!Storage::try_read_vectored_at(&f, 0, &mut []));
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn files_read_and_write_scattered_buffers_in_one_pass() {
        let path = std::env::temp_dir().join(format!("block-vec-{}", std::process::id()));
        let f = scratch_file(&path);
        let (a, b, c) = (vec![1u8; 1000], vec![2u8; 1500], vec![3u8; 500]);
        Storage::write_vectored_at(
            &f,
            100,
            &[
                IoSlice::new(&a),
                IoSlice::new(&[]),
                IoSlice::new(&b),
                IoSlice::new(&c),
            ],
        )
        .unwrap();
        assert_eq!(f.file_len().unwrap(), 3100);
        // Across the end of the file: the part past it reads as zeros.
        let (mut x, mut y, mut z) = (vec![9u8; 1100], vec![9u8; 1500], vec![9u8; 1000]);
        Storage::read_vectored_at(
            &f,
            0,
            &mut [
                IoSliceMut::new(&mut x),
                IoSliceMut::new(&mut y),
                IoSliceMut::new(&mut z),
            ],
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&x[..100], &[0u8; 100][..]);
        assert_eq!(&x[100..], &a[..]);
        assert_eq!(y, b);
        assert_eq!(&z[..500], &c[..]);
        assert_eq!(&z[500..], &[0u8; 500][..]);
    }
}
