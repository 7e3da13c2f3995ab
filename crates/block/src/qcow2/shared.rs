//! A qcow2 image served by several threads at once.
//!
//! The image's tables, cache and allocator stay behind one lock, which an allocating
//! write holds for its whole length (two syncs). A read or write of data clusters that
//! are allocated and written in place needs none of that: the first request on such a
//! cluster looks it up under the lock and records it in [`Unlocked`], and from then on
//! requests on it find its host offset there and move the data by positioned I/O on the
//! file without the image's lock. Anything else (allocation, copy-on-write, zero and
//! unallocated clusters, backing files, compressed clusters) runs under the lock as
//! before, so allocation stays serialized. A cluster leaves [`Unlocked`] before its L2
//! entry changes, and is freed only once the requests doing I/O on it have finished
//! ([`Qcow2::release`] waits on the gate they hold).

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{Mapping, Qcow2};
use crate::error::{BlockError, Qcow2Error};
use crate::storage::Storage;
use crate::{BlockBackend, BlockStatus, SharedIo};

/// Clusters [`Unlocked`] records at most (about 6 MiB of map): 16 GiB of 64 KiB
/// clusters. When full it starts over, and requests look clusters up again.
const MAX_UNLOCKED: usize = 1 << 18;

/// A qcow2 disk whose data reads and writes of allocated clusters run in parallel
/// ([`BlockBackend::shared_io`]); the rest of its requests go through the image's lock.
#[derive(Debug)]
pub struct Qcow2Disk {
    io: Arc<Qcow2Io>,
}

/// The part of a [`Qcow2Disk`] every thread serving it shares.
#[derive(Debug)]
pub struct Qcow2Io {
    image: Mutex<Qcow2>,
    file: Arc<dyn Storage>,
    unlocked: Arc<Unlocked>,
    /// Fixed for the disk's life: nothing resizes an image while a disk serves it.
    size: u64,
    cluster_bits: u32,
    read_only: bool,
    /// A write outside the lock changed the file since the last flush (those under it
    /// mark the image's own flag). Cleared by a flush before it syncs.
    dirty: AtomicBool,
}

/// The data clusters requests use without the image's lock, and the gate that keeps
/// them allocated while they do.
#[derive(Debug, Default)]
pub(super) struct Unlocked {
    /// Guest cluster index → host offset, for data clusters written in place (their L2
    /// entry has COPIED).
    clusters: RwLock<HashMap<u64, u64>>,
    /// Held for reading by a request from before it looks its clusters up until its I/O
    /// ends; for writing before clusters are freed.
    gate: RwLock<()>,
}

impl Unlocked {
    /// Guest cluster `index` must be looked up again: its L2 entry is about to change.
    pub(super) fn forget(&self, index: u64) {
        self.clusters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }

    /// Waits for the requests doing I/O on clusters they looked up, and keeps new ones
    /// out while held.
    pub(super) fn no_io(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, found: &[(u64, u64)]) {
        if found.is_empty() {
            return;
        }
        let mut c = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        if c.len() + found.len() > MAX_UNLOCKED {
            c.clear();
        }
        c.extend(found.iter().copied());
    }
}

/// Where a run of a request's bytes lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extent {
    /// In the file, from this offset on.
    Host(u64),
    /// Nowhere: the run reads as zeros.
    Zeros,
}

/// Appends `n` bytes at `ext` to `runs`, merging it with the last run where it follows.
fn push_run(runs: &mut Vec<(Extent, u64)>, ext: Extent, n: u64) {
    match (runs.last_mut(), ext) {
        (Some((Extent::Host(h), l)), Extent::Host(next)) if *h + *l == next => *l += n,
        (Some((Extent::Zeros, l)), Extent::Zeros) => *l += n,
        _ => runs.push((ext, n)),
    }
}

/// What a lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    /// As [`Access::Read`], with no table read from disk.
    TryRead,
    /// As [`Access::Write`], with no table read from disk.
    TryWrite,
}

impl Access {
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::TryWrite)
    }

    fn waits(self) -> bool {
        matches!(self, Access::Read | Access::Write)
    }
}

/// Where a request's bytes lie, run by run, and how long each run is.
type Runs = Vec<(Extent, u64)>;

/// A request's runs, and the clusters its lookups found written in place.
type Plan = (Runs, Vec<(u64, u64)>);

impl Qcow2 {
    /// The runs `[offset, offset+len)` consists of, if the request can be done by
    /// positioned I/O alone: None when some cluster needs the image (allocation,
    /// copy-on-write, a backing file, a compressed cluster, or, without waiting, a table
    /// not in memory). The range must have been checked.
    fn plan(
        &mut self,
        offset: u64,
        len: usize,
        access: Access,
    ) -> Result<Option<Plan>, Qcow2Error> {
        let cs = self.cs();
        let cb = self.header.cluster_bits;
        let mut runs = Vec::new();
        let mut found = Vec::new();
        for (pos, range) in self.chunks(offset, len) {
            let mapping = if access.waits() {
                self.lookup(pos)?
            } else {
                match self.try_lookup(pos) {
                    Some(m) => m,
                    None => return Ok(None),
                }
            };
            let ext = match mapping {
                Mapping::Data { host, copied } if copied || !access.writes() => {
                    if copied {
                        found.push((pos >> cb, host));
                    }
                    Extent::Host(host + pos % cs)
                }
                _ if access.writes() => return Ok(None),
                Mapping::Zero { .. } => Extent::Zeros,
                Mapping::Unallocated if self.backing.is_none() => Extent::Zeros,
                _ => return Ok(None),
            };
            push_run(&mut runs, ext, range.len() as u64);
        }
        Ok(Some((runs, found)))
    }
}

/// Hands `bufs` out run by run: `each` gets each run and the parts of the buffers it
/// covers (the runs' lengths sum to the buffers').
fn split_mut<E>(
    bufs: &mut [IoSliceMut<'_>],
    runs: &[(Extent, u64)],
    mut each: impl FnMut(Extent, &mut [IoSliceMut<'_>]) -> Result<(), E>,
) -> Result<(), E> {
    let mut rest: VecDeque<&mut [u8]> = bufs.iter_mut().map(|b| &mut **b).collect();
    for &(ext, len) in runs {
        let mut need = len as usize;
        let mut part = Vec::new();
        while need > 0 {
            let Some(s) = rest.pop_front() else { break };
            if s.len() > need {
                let (head, tail) = s.split_at_mut(need);
                rest.push_front(tail);
                part.push(IoSliceMut::new(head));
                need = 0;
            } else {
                need -= s.len();
                part.push(IoSliceMut::new(s));
            }
        }
        each(ext, &mut part)?;
    }
    Ok(())
}

/// [`split_mut`] for buffers to write.
fn split<E>(
    bufs: &[IoSlice<'_>],
    runs: &[(Extent, u64)],
    mut each: impl FnMut(Extent, &[IoSlice<'_>]) -> Result<(), E>,
) -> Result<(), E> {
    let mut rest: VecDeque<&[u8]> = bufs.iter().map(|b| &**b).collect();
    for &(ext, len) in runs {
        let mut need = len as usize;
        let mut part = Vec::new();
        while need > 0 {
            let Some(s) = rest.pop_front() else { break };
            if s.len() > need {
                let (head, tail) = s.split_at(need);
                rest.push_front(tail);
                part.push(IoSlice::new(head));
                need = 0;
            } else {
                need -= s.len();
                part.push(IoSlice::new(s));
            }
        }
        each(ext, &part)?;
    }
    Ok(())
}

fn total<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

impl Qcow2Disk {
    /// Serves `image` (its backing file attached, if any).
    pub fn new(image: Qcow2) -> Self {
        Qcow2Disk {
            io: Arc::new(Qcow2Io {
                file: Arc::clone(&image.file),
                unlocked: Arc::clone(&image.unlocked),
                size: image.header.size,
                cluster_bits: image.header.cluster_bits,
                read_only: image.read_only,
                dirty: AtomicBool::new(false),
                image: Mutex::new(image),
            }),
        }
    }
}

impl Qcow2Io {
    fn image(&self) -> MutexGuard<'_, Qcow2> {
        // A panic under the lock is a bug already reported; the image's tables are
        // written through, so its state is the best there is.
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), BlockError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// The runs of `[offset, offset+len)` if [`Unlocked`] holds every cluster of it.
    /// The caller holds the gate.
    fn recorded(&self, offset: u64, len: usize) -> Option<Runs> {
        let cs = 1u64 << self.cluster_bits;
        let clusters = self
            .unlocked
            .clusters
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut runs = Vec::new();
        let (mut pos, end) = (offset, offset + len as u64);
        while pos < end {
            let host = *clusters.get(&(pos >> self.cluster_bits))?;
            let n = (cs - pos % cs).min(end - pos);
            push_run(&mut runs, Extent::Host(host + pos % cs), n);
            pos += n;
        }
        Some(runs)
    }

    /// Looks the request up under the image's lock, which `image` holds: the runs, with
    /// the gate held for their I/O (taken before the lock is let go, so no release
    /// starts in between), or None with the image still held, for the caller to serve
    /// through it.
    fn plan<'a>(
        &'a self,
        image: &mut MutexGuard<'a, Qcow2>,
        offset: u64,
        len: usize,
        access: Access,
    ) -> Result<Option<(Runs, RwLockReadGuard<'a, ()>)>, BlockError> {
        let Some((runs, found)) = image.plan(offset, len, access)? else {
            return Ok(None);
        };
        self.unlocked.remember(&found);
        // Only a holder of the image's lock waits on the gate for writing: this cannot
        // wait.
        Ok(Some((runs, self.unlocked.io())))
    }

    fn read_runs(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        runs: &[(Extent, u64)],
    ) -> Result<(), BlockError> {
        split_mut(bufs, runs, |ext, part| match ext {
            Extent::Host(at) => self
                .file
                .read_vectored_at(at, part)
                .map_err(|source| Qcow2Error::ReadData { offset: at, source }),
            Extent::Zeros => {
                part.iter_mut().for_each(|p| p.fill(0));
                Ok(())
            }
        })?;
        Ok(())
    }

    fn try_read_runs(&self, bufs: &mut [IoSliceMut<'_>], runs: &[(Extent, u64)]) -> bool {
        split_mut(bufs, runs, |ext, part| match ext {
            Extent::Host(at) if self.file.try_read_vectored_at(at, part) => Ok(()),
            Extent::Host(_) => Err(()),
            Extent::Zeros => {
                part.iter_mut().for_each(|p| p.fill(0));
                Ok(())
            }
        })
        .is_ok()
    }

    fn write_runs(&self, bufs: &[IoSlice<'_>], runs: &[(Extent, u64)]) -> Result<(), BlockError> {
        self.dirty.store(true, Ordering::SeqCst);
        split(bufs, runs, |ext, part| match ext {
            Extent::Host(at) => self
                .file
                .write_vectored_at(at, part)
                .map_err(|source| Qcow2Error::WriteData { offset: at, source }),
            // A write's runs have none.
            Extent::Zeros => Ok(()),
        })?;
        Ok(())
    }
}

impl SharedIo for Qcow2Io {
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        let len = total(bufs);
        self.check_range(offset, len)?;
        {
            let _io = self.unlocked.io();
            if let Some(runs) = self.recorded(offset, len) {
                return self.read_runs(bufs, &runs);
            }
        }
        let mut image = self.image();
        let Some((runs, _io)) = self.plan(&mut image, offset, len, Access::Read)? else {
            return image.read_vectored_at(offset, bufs);
        };
        drop(image);
        self.read_runs(bufs, &runs)
    }

    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        let len = total(bufs);
        if self.check_range(offset, len).is_err() {
            return false;
        }
        {
            // A writer there is freeing clusters: it may wait for I/O.
            let Ok(_io) = self.unlocked.gate.try_read() else {
                return false;
            };
            if let Some(runs) = self.recorded(offset, len) {
                return self.try_read_runs(bufs, &runs);
            }
        }
        // Whoever holds the image may be waiting for the disk.
        let Ok(mut image) = self.image.try_lock() else {
            return false;
        };
        match self.plan(&mut image, offset, len, Access::TryRead) {
            Ok(Some((runs, _io))) => {
                drop(image);
                self.try_read_runs(bufs, &runs)
            }
            _ => image.try_read_vectored_at(offset, bufs),
        }
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let len = total(bufs);
        self.check_range(offset, len)?;
        {
            let _io = self.unlocked.io();
            if let Some(runs) = self.recorded(offset, len) {
                return self.write_runs(bufs, &runs);
            }
        }
        let mut image = self.image();
        let Some((runs, _io)) = self.plan(&mut image, offset, len, Access::Write)? else {
            return image.write_vectored_at(offset, bufs);
        };
        drop(image);
        self.write_runs(bufs, &runs)
    }

    fn try_write_vectored_at(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> Option<Result<(), BlockError>> {
        if self.read_only {
            return Some(Err(BlockError::ReadOnly));
        }
        let len = total(bufs);
        if let Err(e) = self.check_range(offset, len) {
            return Some(Err(e));
        }
        {
            let _io = self.unlocked.gate.try_read().ok()?;
            if let Some(runs) = self.recorded(offset, len) {
                return Some(self.write_runs(bufs, &runs));
            }
        }
        let mut image = self.image.try_lock().ok()?;
        let (runs, _io) = self
            .plan(&mut image, offset, len, Access::TryWrite)
            .ok()??;
        drop(image);
        Some(self.write_runs(bufs, &runs))
    }
}

impl BlockBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.io.size
    }

    fn read_only(&self) -> bool {
        self.io.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.io
            .read_vectored_at(offset, &mut [IoSliceMut::new(buf)])
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.io.write_vectored_at(offset, &[IoSlice::new(buf)])
    }

    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<(), BlockError> {
        self.io.read_vectored_at(offset, bufs)
    }

    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> bool {
        self.io.try_read_vectored_at(offset, bufs)
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        self.io.write_vectored_at(offset, bufs)
    }

    /// Syncs without the image's lock, so requests go on meanwhile.
    fn flush(&mut self) -> Result<(), BlockError> {
        let outside = self.io.dirty.swap(false, Ordering::SeqCst);
        let inside = std::mem::take(&mut self.io.image().dirty);
        if outside || inside {
            if let Err(e) = self.io.file.sync() {
                self.io.dirty.store(true, Ordering::SeqCst);
                return Err(Qcow2Error::Sync(e).into());
            }
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.io.image().discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.io.image().write_zeroes(offset, len)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError> {
        self.io.image().block_status(offset, len)
    }

    fn shared_io(&self) -> Option<Arc<dyn SharedIo>> {
        Some(Arc::clone(&self.io) as Arc<dyn SharedIo>)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A 1 MiB image of 64 KiB clusters, held in memory.
    fn disk(tag: &str) -> Qcow2Disk {
        Qcow2Disk::new(crate::qcow2::tests::in_memory(
            &format!("shared-{tag}"),
            2 << 20,
        ))
    }

    #[test]
    fn allocated_clusters_are_read_and_written_while_another_request_holds_the_image() {
        let mut d = disk("held");
        d.write_at(0, &[1; 8192]).unwrap(); // allocates cluster 0
        let mut b = [0u8; 512];
        d.read_at(0, &mut b).unwrap(); // looks it up: from now on it needs no lock
        let io = d.shared_io().unwrap();
        let held = d.io.image(); // as an allocating write would, for its whole length
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                io.write_vectored_at(4096, &[IoSlice::new(&[2; 4096])])
                    .unwrap();
                let mut b = [0u8; 8192];
                io.read_vectored_at(0, &mut [IoSliceMut::new(&mut b)])
                    .unwrap();
                tx.send(b).unwrap();
            });
            let b = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the shared path waited for the image");
            assert_eq!(&b[..4096], &[1; 4096]);
            assert_eq!(&b[4096..], &[2; 4096]);
            // Nothing that would allocate, or wait, is tried meanwhile.
            assert!(io
                .try_write_vectored_at(65536, &[IoSlice::new(&[3; 512])])
                .is_none());
            drop(held);
        });
        // An allocating write takes the image's path.
        let mut c = [0u8; 512];
        assert!(io
            .try_write_vectored_at(65536, &[IoSlice::new(&[3; 512])])
            .is_none());
        io.write_vectored_at(65536, &[IoSlice::new(&[3; 512])])
            .unwrap();
        d.read_at(65536, &mut c).unwrap();
        assert_eq!(c, [3; 512]);
        assert!(io
            .try_write_vectored_at(65536, &[IoSlice::new(&[4; 512])])
            .is_some_and(|r| r.is_ok()));
        d.read_at(65536, &mut c).unwrap();
        assert_eq!(c, [4; 512]);
        assert!(d.io.dirty.load(Ordering::SeqCst));
        d.flush().unwrap();
        assert!(!d.io.dirty.load(Ordering::SeqCst) && !d.io.image().dirty);
        assert!(matches!(
            io.write_vectored_at(1 << 20, &[IoSlice::new(&[0; 512])]),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_cluster_is_freed_only_after_io_on_it_has_finished() {
        let mut d = disk("gate");
        d.write_at(0, &[1; 65536]).unwrap();
        let host = match d.io.image().lookup(0).unwrap() {
            Mapping::Data { host, .. } => host,
            m => panic!("cluster 0 is {m:?}"),
        };
        let refcount = |d: &Qcow2Disk| {
            let mut image = d.io.image();
            let cs = image.cs();
            let Qcow2 { refs, file, .. } = &mut *image;
            refs.get(file.as_ref(), host / cs).unwrap()
        };
        assert_eq!(refcount(&d), 1);
        let mut b = [9u8; 512];
        d.read_at(0, &mut b).unwrap();
        assert!(
            d.io.recorded(0, 512).is_some(),
            "a lookup records the cluster"
        );
        // A request on the shared path looked the cluster up and is doing its I/O.
        let in_flight = d.io.unlocked.io();
        let io = Arc::clone(&d.io);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(move || {
                io.image().discard(0, 65536).unwrap();
                tx.send(()).unwrap();
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "the discard freed the cluster under a request's I/O"
            );
            drop(in_flight);
            rx.recv_timeout(Duration::from_secs(5))
                .expect("the discard finished once the I/O had");
        });
        assert_eq!(refcount(&d), 0);
        assert!(
            d.io.recorded(0, 512).is_none(),
            "a freed cluster is still recorded"
        );
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0; 512]);
    }
}
