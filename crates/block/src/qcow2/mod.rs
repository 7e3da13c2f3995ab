//! qcow2 (versions 2 and 3) backend: reads, writes with cluster allocation, backing files,
//! zero clusters, deflate-compressed clusters (read), discard and write-zeroes, growing.
//!
//! Metadata is written through (never cached dirty), in this order for an allocating write:
//! data cluster and its refcount, sync, then the L2 entry (a new L2 table is itself
//! refcounted, written and synced before the L1 entry points at it). A crash at any point
//! leaves at worst leaked clusters, which `qemu-img check` reports but does not call
//! corruption. Lazy refcounts are never used, so the dirty bit is never set.

pub mod check;
mod compressed;
pub mod header;
mod l2cache;
mod refcount;
mod shared;

use std::sync::Arc;

use tracing::{debug, warn};

use crate::error::{BlockError, Qcow2Error};
use crate::storage::Storage;
use crate::{BlockBackend, BlockStatus};
use header::Header;
use l2cache::L2Cache;
use refcount::Refcounts;
use shared::Unlocked;
pub use shared::{Qcow2Disk, Qcow2Io};

/// Offset bits of L1 and standard L2 entries (9..=55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry flag: refcount is exactly one, the cluster may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;
/// Reserved bits that must be clear in an L1 entry.
pub(crate) const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits that must be clear in a standard L2 entry.
pub(crate) const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bytes of L2 tables cached per open image at most (QEMU's default on Linux): enough
/// for the whole of a 256 GiB image with 64 KiB clusters, 512 MiB with 512-byte ones.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// How many L2 tables to cache for an image whose L1 table has `l1_entries` entries of
/// `cluster_size`-byte tables: all of them (tables are read on first use, so this costs
/// memory only for what the guest touches), up to [`L2_CACHE_BYTES`].
fn l2_cache_tables(l1_entries: usize, cluster_size: u64) -> usize {
    let most = usize::try_from(L2_CACHE_BYTES / cluster_size.max(1)).unwrap_or(usize::MAX);
    l1_entries.clamp(1, most.max(1))
}

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster to free when replaced (0 if none).
    Zero { host: u64 },
    /// A data cluster at `host`; `copied` says it may be written in place.
    Data { host: u64, copied: bool },
    /// A compressed cluster.
    Compressed { entry: u64 },
}

/// A guest cluster whose new data is written and refcounted but whose L2 entry is not.
#[derive(Debug)]
struct PendingLink {
    guest: u64,
    entry: u64,
    old: Mapping,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    /// Shared with [`Qcow2Io`], which reads and writes data clusters without the lock
    /// this struct sits behind there.
    file: Arc<dyn Storage>,
    header: Header,
    l1: Vec<u64>,
    l2: L2Cache,
    refs: Refcounts,
    backing: Option<Box<dyn BlockBackend>>,
    read_only: bool,
    /// Last inflated compressed cluster, keyed by its L2 entry.
    inflated: Option<(u64, Vec<u8>)>,
    /// A request changed the file since the last flush.
    dirty: bool,
    /// The data clusters [`Qcow2Io`] reads and writes without this struct: an entry
    /// leaves it before its L2 entry changes, and a cluster is freed only after the I/O
    /// on it has finished.
    unlocked: Arc<Unlocked>,
}

impl Qcow2 {
    /// Opens the image in `file`. The backing file named in the header is not opened:
    /// attach it with [`Qcow2::set_backing`] (as [`crate::open`] does).
    pub fn open(file: Box<dyn Storage>, read_only: bool) -> Result<Self, Qcow2Error> {
        let file: Arc<dyn Storage> = Arc::from(file);
        let file_len = file.file_len().map_err(Qcow2Error::FileLength)?;
        if file_len < u64::from(header::V2_HEADER_LEN) {
            return Err(header::HeaderError::Truncated.into());
        }
        let mut first = [0u8; 32];
        file.read_at(0, &mut first)
            .map_err(Qcow2Error::ReadHeader)?;
        let cluster_bits = Header::peek_cluster_bits(&first)?;
        let cs = 1u64 << cluster_bits;
        let mut buf = vec![0u8; cs.min(file_len) as usize];
        file.read_at(0, &mut buf).map_err(Qcow2Error::ReadHeader)?;
        let header = Header::parse(&buf)?;
        if !read_only {
            if header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                return Err(Qcow2Error::DirtyImage);
            }
            if header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                return Err(Qcow2Error::CorruptImage);
            }
            if header.nb_snapshots > 0 {
                return Err(Qcow2Error::HasSnapshots);
            }
        }
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_size > 0 && header.l1_table_offset + l1_bytes > file_len {
            return Err(header::HeaderError::L1("table extends past the end of the file").into());
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_at(header.l1_table_offset, &mut raw)
            .map_err(Qcow2Error::ReadL1)?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect();
        let table_bytes = u64::from(header.refcount_table_clusters) * cs;
        if header.refcount_table_offset + table_bytes > file_len.div_ceil(cs) * cs {
            return Err(
                header::HeaderError::RefcountTable("extends past the end of the file").into(),
            );
        }
        let mut refs = Refcounts::load(
            file.as_ref(),
            cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            file_len,
        )?;
        refs.set_l1_reserved(header.l1_table_offset, l1_bytes);
        let l2 = L2Cache::new(l2_cache_tables(l1.len(), cs), (cs / 8) as usize);
        let mut q = Qcow2 {
            file,
            header,
            l1,
            l2,
            refs,
            backing: None,
            read_only,
            inflated: None,
            dirty: false,
            unlocked: Arc::default(),
        };
        if !read_only && q.header.autoclear_features != 0 {
            // We maintain none of the autoclear features: clearing them tells other readers
            // that the data they describe (e.g. bitmaps) may be stale.
            q.file
                .write_at(header::OFF_AUTOCLEAR, &0u64.to_be_bytes())
                .map_err(Qcow2Error::WriteHeader)?;
            q.sync()?;
            q.header.autoclear_features = 0;
        }
        debug!(size = q.header.size, cluster_bits, "qcow2: opened");
        Ok(q)
    }

    /// Lets [`check::check`] lower leaked refcounts in an image opened read-only (so with
    /// the read-only open's rules: internal snapshots are fine, their refcounts are part
    /// of the walk). The file must have been opened for writing.
    pub(crate) fn allow_refcount_repair(&mut self) {
        self.read_only = false;
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Attaches the backing file the header names (opened read-only by the caller).
    pub fn set_backing(&mut self, backing: Box<dyn BlockBackend>) {
        self.backing = Some(backing);
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }

    fn sync(&self) -> Result<(), Qcow2Error> {
        self.file.sync().map_err(Qcow2Error::Sync)
    }

    fn split(&self, guest: u64) -> (u64, usize) {
        let cb = self.header.cluster_bits;
        (
            guest >> (2 * cb - 3),
            ((guest >> cb) & (self.l2_entries() - 1)) as usize,
        )
    }

    /// The host offset of the L2 table covering `guest`, or 0 if none.
    fn l2_offset(&self, guest: u64) -> Result<u64, Qcow2Error> {
        let (l1_index, _) = self.split(guest);
        let Some(&e) = self.l1.get(l1_index as usize) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        let bad = |why| Qcow2Error::InvalidL1Entry {
            index: l1_index,
            entry: e,
            why,
        };
        if e & L1_RESERVED != 0 {
            return Err(bad("reserved bits set"));
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(bad("L2 table not cluster-aligned"));
        }
        if off != 0 && off >= self.refs.file_end() {
            return Err(bad("L2 table past the end of the file"));
        }
        Ok(off)
    }

    fn lookup(&mut self, guest: u64) -> Result<Mapping, Qcow2Error> {
        let l2_off = self.l2_offset(guest)?;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let (_, l2_index) = self.split(guest);
        let entry = self
            .l2
            .get(self.file.as_ref(), l2_off)?
            .get(l2_index)
            .copied()
            .unwrap_or(0);
        self.decode(guest, entry)
    }

    /// [`Qcow2::lookup`] without waiting for the disk: None when the L2 table is neither
    /// cached nor in the host's page cache, or the entry is invalid (the full read
    /// reports that).
    fn try_lookup(&mut self, guest: u64) -> Option<Mapping> {
        let l2_off = self.l2_offset(guest).ok()?;
        if l2_off == 0 {
            return Some(Mapping::Unallocated);
        }
        let (_, l2_index) = self.split(guest);
        let entry = self
            .l2
            .try_get(self.file.as_ref(), l2_off)?
            .get(l2_index)
            .copied()
            .unwrap_or(0);
        self.decode(guest, entry).ok()
    }

    /// [`Qcow2::read_in_cluster`] only if nothing needs the disk: the L2 table and the
    /// data (here or in the backing chain) are in memory or the host's page cache, or the
    /// cluster reads as zeros. False when the full read must do it.
    fn try_read_in_cluster(&mut self, offset: u64, buf: &mut [u8]) -> bool {
        let in_cluster = offset % self.cs();
        match self.try_lookup(offset) {
            None => false,
            Some(Mapping::Zero { .. }) => {
                buf.fill(0);
                true
            }
            Some(Mapping::Unallocated) => {
                let Some(b) = self.backing.as_mut() else {
                    buf.fill(0);
                    return true;
                };
                let avail = b.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(avail);
                if !head.is_empty()
                    && !b.try_read_vectored_at(offset, &mut [std::io::IoSliceMut::new(head)])
                {
                    return false;
                }
                tail.fill(0);
                true
            }
            Some(Mapping::Data { host, .. }) => self
                .file
                .try_read_vectored_at(host + in_cluster, &mut [std::io::IoSliceMut::new(buf)]),
            // Only the cluster inflated last is at hand without reading the file.
            Some(Mapping::Compressed { entry }) => {
                let s = in_cluster as usize;
                match &self.inflated {
                    Some((e, data)) if *e == entry => match data.get(s..s + buf.len()) {
                        Some(src) => {
                            buf.copy_from_slice(src);
                            true
                        }
                        None => false,
                    },
                    _ => false,
                }
            }
        }
    }

    fn decode(&self, guest: u64, entry: u64) -> Result<Mapping, Qcow2Error> {
        let bad = |why| Qcow2Error::InvalidL2Entry { guest, entry, why };
        if entry & COMPRESSED != 0 {
            return Ok(Mapping::Compressed { entry });
        }
        if entry & L2_RESERVED != 0 {
            return Err(bad("reserved bits set"));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(self.cs()) {
            return Err(bad("data cluster not cluster-aligned"));
        }
        if host != 0 && host >= self.refs.file_end() {
            return Err(bad("data cluster past the end of the file"));
        }
        if entry & ZERO != 0 {
            if self.header.version < 3 {
                return Err(bad("zero flag in a version 2 image"));
            }
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.header.size,
            }),
        }
    }

    /// Reads `buf` at guest `offset`, which must lie in one cluster.
    fn read_in_cluster(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let in_cluster = offset % self.cs();
        match self.lookup(offset)? {
            Mapping::Zero { .. } => buf.fill(0),
            Mapping::Unallocated => self.read_backing(offset, buf)?,
            Mapping::Data { host, .. } => {
                let at = host + in_cluster;
                self.file
                    .read_at(at, buf)
                    .map_err(|source| Qcow2Error::ReadData { offset: at, source })?;
            }
            Mapping::Compressed { entry } => {
                let s = in_cluster as usize;
                let src = self
                    .read_compressed(offset, entry)?
                    .get(s..s + buf.len())
                    .ok_or(Qcow2Error::Compressed {
                        guest: offset,
                        why: "inflated cluster too short",
                    })?;
                buf.copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn read_backing(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            b.read_at(offset, head)
                .map_err(|e| Qcow2Error::Backing(Box::new(e)))?;
        }
        tail.fill(0);
        Ok(())
    }

    /// The decompressed cluster for a compressed L2 entry; the last one is kept, so
    /// sequential small reads inflate each cluster once.
    fn read_compressed(&mut self, guest: u64, entry: u64) -> Result<&[u8], Qcow2Error> {
        if self.inflated.as_ref().is_none_or(|(e, _)| *e != entry) {
            let data = compressed::read_cluster(
                self.file.as_ref(),
                &self.header,
                self.refs.file_end(),
                guest,
                entry,
            )?;
            self.inflated = Some((entry, data));
        }
        Ok(self.inflated.as_ref().map_or(&[], |(_, d)| d.as_slice()))
    }

    /// Iterates `(guest offset, range in buf)` over the clusters a request touches.
    fn chunks(&self, offset: u64, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
        let cs = self.cs();
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let n = ((cs - pos % cs) as usize).min(len - done);
            out.push((pos, done..done + n));
            done += n;
        }
        out
    }

    /// Allocates a cluster for guest cluster at `guest_start` holding `data` (a full
    /// cluster), writes it, and returns the L2 entry that will point at it.
    fn write_new_cluster(&mut self, data: &[u8]) -> Result<u64, Qcow2Error> {
        let host = self.refs.alloc(self.file.as_ref(), 1)?;
        self.file
            .write_at(host, data)
            .map_err(|source| Qcow2Error::WriteData {
                offset: host,
                source,
            })?;
        Ok(host | COPIED)
    }

    /// Host offset of the L2 table for `guest`, allocating an empty one if needed.
    fn l2_for_write(&mut self, guest: u64) -> Result<u64, Qcow2Error> {
        let off = self.l2_offset(guest)?;
        if off != 0 {
            return Ok(off);
        }
        let (l1_index, _) = self.split(guest);
        let off = self.refs.alloc(self.file.as_ref(), 1)?;
        let zeros = vec![0u8; self.cs() as usize];
        self.file
            .write_at(off, &zeros)
            .map_err(|source| Qcow2Error::WriteL2 {
                offset: off,
                source,
            })?;
        self.sync()?;
        let entry = off | COPIED;
        let at = self.header.l1_table_offset + l1_index * 8;
        self.file
            .write_at(at, &entry.to_be_bytes())
            .map_err(Qcow2Error::WriteL1)?;
        if let Some(slot) = self.l1.get_mut(l1_index as usize) {
            *slot = entry;
        }
        self.l2.insert_zeroed(off);
        Ok(off)
    }

    /// Points the L2 entries at their new clusters, then releases what they replaced.
    fn link(&mut self, pending: Vec<PendingLink>) -> Result<(), Qcow2Error> {
        if pending.is_empty() {
            return Ok(());
        }
        // Barrier: data and refcounts are durable before any entry references them.
        self.sync()?;
        for p in &pending {
            let l2_off = self.l2_for_write(p.guest)?;
            let (_, idx) = self.split(p.guest);
            self.unlocked.forget(p.guest >> self.header.cluster_bits);
            self.l2.set(self.file.as_ref(), l2_off, idx, p.entry)?;
        }
        let freed: Vec<Mapping> = pending.iter().map(|p| p.old).collect();
        self.release(&freed)
    }

    /// Drops the references the replaced mappings held. Their L2 entries must already
    /// point elsewhere; they are synced first so a crash leaks rather than corrupts.
    fn release(&mut self, old: &[Mapping]) -> Result<(), Qcow2Error> {
        self.inflated = None;
        let mut hosts = Vec::new();
        for m in old {
            match *m {
                Mapping::Data { host, .. } | Mapping::Zero { host } if host != 0 => {
                    hosts.push((host, 1))
                }
                Mapping::Compressed { entry } => {
                    let (start, n) = compressed::host_clusters(&self.header, entry);
                    for c in 0..n {
                        hosts.push((start + c * self.cs(), 0));
                    }
                }
                _ => {}
            }
        }
        if hosts.is_empty() {
            return Ok(());
        }
        self.sync()?;
        let cs = self.cs();
        // Requests still doing I/O on these clusters (looked up before the entries
        // changed) finish first; later ones see the new entries.
        let unlocked = Arc::clone(&self.unlocked);
        let _no_io = unlocked.no_io();
        for (host, punch) in hosts {
            let left = self.refs.update(self.file.as_ref(), host, -1)?;
            if left == 0 && punch == 1 {
                if let Err(e) = self.file.punch_hole(host, cs) {
                    warn!(host, error = %e, "qcow2: could not punch a freed cluster");
                }
            }
        }
        Ok(())
    }

    fn write_impl(&mut self, offset: u64, buf: &[u8]) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let mut pending = Vec::new();
        for (pos, range) in self.chunks(offset, buf.len()) {
            let data = &buf[range];
            let mapping = self.lookup(pos)?;
            let in_place = match mapping {
                Mapping::Data { host, copied: true } => Some(host),
                Mapping::Data {
                    host,
                    copied: false,
                } => {
                    // Images written by other tools may lack the flag; a refcount of one
                    // still allows writing in place.
                    (self.refs.get(self.file.as_ref(), host / cs)? == 1).then_some(host)
                }
                _ => None,
            };
            if let Some(host) = in_place {
                let at = host + pos % cs;
                self.file
                    .write_at(at, data)
                    .map_err(|source| Qcow2Error::WriteData { offset: at, source })?;
                continue;
            }
            // Copy-on-write: the cluster's current content with the new data laid over it.
            let start = pos - pos % cs;
            let mut cluster = vec![0u8; cs as usize];
            let readable = (self.header.size - start).min(cs) as usize;
            if data.len() as u64 != cs {
                self.read_in_cluster(start, &mut cluster[..readable])?;
            }
            let s = (pos - start) as usize;
            cluster[s..s + data.len()].copy_from_slice(data);
            // A preallocated zero cluster we own is filled in place: its data is written
            // (and synced in `link`) before the entry loses the zero flag.
            let reuse = match mapping {
                Mapping::Zero { host } if host != 0 => {
                    (self.refs.get(self.file.as_ref(), host / cs)? == 1).then_some(host)
                }
                _ => None,
            };
            let (entry, old) = match reuse {
                Some(host) => {
                    self.file
                        .write_at(host, &cluster)
                        .map_err(|source| Qcow2Error::WriteData {
                            offset: host,
                            source,
                        })?;
                    (host | COPIED, Mapping::Unallocated)
                }
                None => (self.write_new_cluster(&cluster)?, mapping),
            };
            pending.push(PendingLink {
                guest: start,
                entry,
                old,
            });
        }
        self.link(pending)
    }

    /// Makes whole clusters in `[offset, offset+len)` read as zeros without data; returns
    /// the byte ranges (partial clusters, or clusters it could not zero by metadata) left
    /// to the caller.
    fn zero_clusters(
        &mut self,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<Vec<(u64, u64)>, Qcow2Error> {
        let cs = self.cs();
        let end = offset + len;
        let mut rest = Vec::new();
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = if end == self.header.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if first_full >= last_full {
            return Ok(vec![(offset, len)]);
        }
        if offset < first_full {
            rest.push((offset, first_full - offset));
        }
        let clip_end = last_full.min(end);
        if clip_end < end {
            rest.push((clip_end, end - clip_end));
        }
        let has_backing = self.backing.is_some();
        let v3 = self.header.version >= 3;
        let new_entry = match (has_backing, v3) {
            (false, _) => Some(0),
            (true, true) => Some(ZERO),
            (true, false) => None,
        };
        let Some(new_entry) = new_entry else {
            if !discard {
                rest.push((first_full, clip_end - first_full));
            }
            return Ok(rest);
        };
        let mut old = Vec::new();
        let mut pos = first_full;
        while pos < last_full {
            let mapping = self.lookup(pos)?;
            let already = match mapping {
                Mapping::Zero { host: 0 } => true,
                Mapping::Unallocated => !has_backing,
                _ => false,
            };
            if !already {
                let l2_off = if new_entry == 0 {
                    self.l2_offset(pos)?
                } else {
                    self.l2_for_write(pos)?
                };
                if l2_off != 0 {
                    let (_, idx) = self.split(pos);
                    self.unlocked.forget(pos >> self.header.cluster_bits);
                    self.l2.set(self.file.as_ref(), l2_off, idx, new_entry)?;
                    old.push(mapping);
                }
            }
            pos += cs;
        }
        self.release(&old)?;
        Ok(rest)
    }

    /// Grows the virtual size (shrinking is refused).
    pub fn resize(&mut self, new_size: u64) -> Result<(), Qcow2Error> {
        let old = self.header.size;
        if new_size < old {
            return Err(Qcow2Error::Shrink { old, new: new_size });
        }
        let cb = self.header.cluster_bits;
        if new_size > header::max_virtual_size(cb) {
            return Err(Qcow2Error::SizeTooLarge(new_size));
        }
        let need = header::l1_entries_for(new_size, cb);
        if need > self.l1.len() as u64 {
            self.grow_l1(need)?;
            let cs = self.cs();
            self.l2.set_capacity(l2_cache_tables(self.l1.len(), cs));
        }
        self.file
            .write_at(header::OFF_SIZE, &new_size.to_be_bytes())
            .map_err(Qcow2Error::WriteHeader)?;
        self.sync()?;
        self.header.size = new_size;
        Ok(())
    }

    fn grow_l1(&mut self, entries: u64) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        let off = self.refs.alloc(self.file.as_ref(), clusters)?;
        let mut raw = Vec::with_capacity((clusters * cs) as usize);
        for i in 0..entries as usize {
            raw.extend_from_slice(&self.l1.get(i).copied().unwrap_or(0).to_be_bytes());
        }
        raw.resize((clusters * cs) as usize, 0);
        self.file.write_at(off, &raw).map_err(Qcow2Error::WriteL1)?;
        self.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&off.to_be_bytes());
        self.file
            .write_at(header::OFF_L1_SIZE, &hdr)
            .map_err(Qcow2Error::WriteHeader)?;
        self.sync()?;
        let old_off = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1.resize(entries as usize, 0);
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = off;
        self.refs.set_l1_reserved(off, bytes);
        for c in 0..old_clusters {
            self.refs.update(self.file.as_ref(), old_off + c * cs, -1)?;
        }
        Ok(())
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check_range(offset, buf.len() as u64)?;
        for (pos, range) in self.chunks(offset, buf.len()) {
            self.read_in_cluster(pos, &mut buf[range])?;
        }
        Ok(())
    }

    /// Served from what is in memory or the host's page cache, cluster by cluster (an
    /// overlay's allocated clusters from its file, the rest from the backing chain's own
    /// try), or not at all: a guest read of a cached image then needs no I/O thread.
    fn try_read_vectored_at(&mut self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> bool {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if self.check_range(offset, len).is_err() {
            return false;
        }
        let mut at = offset;
        for b in bufs.iter_mut() {
            for (pos, range) in self.chunks(at, b.len()) {
                let Some(part) = b.get_mut(range) else {
                    return false;
                };
                if !self.try_read_in_cluster(pos, part) {
                    return false;
                }
            }
            at += b.len() as u64;
        }
        true
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_range(offset, buf.len() as u64)?;
        self.dirty = true;
        Ok(self.write_impl(offset, buf)?)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.dirty {
            self.sync()?;
            self.dirty = false;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_range(offset, len)?;
        self.dirty = true;
        self.zero_clusters(offset, len, true)?;
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_range(offset, len)?;
        self.dirty = true;
        for (off, n) in self.zero_clusters(offset, len, false)? {
            crate::write_zero_bytes(self, off, n)?;
        }
        Ok(())
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), BlockError> {
        self.check_range(offset, len)?;
        let cs = self.cs();
        let end = offset + len;
        let mut pos = offset;
        let mut status = None;
        while pos < end {
            let s = match self.lookup(pos)? {
                Mapping::Zero { .. } => BlockStatus::Zero,
                Mapping::Unallocated => match self.backing.as_mut() {
                    None => BlockStatus::Zero,
                    Some(b) if pos >= b.size() => BlockStatus::Zero,
                    Some(b) => {
                        let n = (cs - pos % cs).min(end - pos).min(b.size() - pos);
                        match b.block_status(pos, n)? {
                            (s, l) if l >= n => s,
                            _ => BlockStatus::Data,
                        }
                    }
                },
                Mapping::Data { .. } | Mapping::Compressed { .. } => BlockStatus::Data,
            };
            match status {
                None => status = Some(s),
                Some(prev) if prev != s => break,
                _ => {}
            }
            pos = (pos - pos % cs + cs).min(end);
        }
        Ok((status.unwrap_or(BlockStatus::Data), pos - offset))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::{create_with, CreateOptions};
    use crate::Format;

    /// A fresh 1 MiB qcow2 image (default clusters) held in memory, with `room` bytes
    /// after it to grow into; `tag` names its scratch file.
    pub(crate) fn in_memory(tag: &str, room: usize) -> Qcow2 {
        let path = std::env::temp_dir().join(format!("vessel-qcow2-{tag}-{}", std::process::id()));
        create_with(
            &path,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(1 << 20),
                backing: None,
                cluster_size: None,
            },
        )
        .unwrap();
        let mut image = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        image.resize(image.len() + room, 0);
        Qcow2::open(Box::new(crate::storage::MemStorage::new(image)), false).unwrap()
    }

    #[test]
    fn the_l2_cache_holds_every_table_of_an_image_it_can_cover() {
        // 4 KiB clusters: one L2 table maps 2 MiB, so 256 MiB takes 128 tables (the old
        // fixed cache held 32 and re-read tables on every pass of a random workload).
        let path =
            std::env::temp_dir().join(format!("vessel-l2cache-{}.qcow2", std::process::id()));
        let _ = std::fs::remove_file(&path);
        create_with(
            &path,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(256 << 20),
                backing: None,
                cluster_size: Some(4096),
            },
        )
        .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let mut q = Qcow2::open(Box::new(file), false).unwrap();
        assert_eq!(q.l1.len(), 128);
        assert_eq!(q.l2.capacity(), 128, "one slot per L2 table of the image");
        let tables = 128u64;
        for t in 0..tables {
            q.write_at(t * (2 << 20), &[t as u8 + 1; 4096]).unwrap();
        }
        let mut buf = [0u8; 4096];
        for t in 0..tables {
            q.read_at(t * (2 << 20), &mut buf).unwrap();
            assert_eq!(buf, [t as u8 + 1; 4096]);
        }
        let reads = q.l2.reads();
        for t in (0..tables).rev() {
            q.read_at(t * (2 << 20) + 4096, &mut buf).unwrap();
            assert_eq!(buf, [0; 4096]);
        }
        assert_eq!(
            q.l2.reads(),
            reads,
            "a second pass read L2 tables from disk again"
        );
    }

    #[test]
    fn a_read_served_without_waiting_matches_the_full_read_across_a_backing_chain() {
        let dir = std::env::temp_dir().join(format!("vessel-qcow2-nowait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
        let opts = |size, backing| CreateOptions {
            format: Format::Qcow2,
            size,
            backing,
            cluster_size: Some(4096),
        };
        create_with(&base, &opts(Some(1 << 20), None)).unwrap();
        {
            let mut b = crate::open(&base, Some(Format::Qcow2), false).unwrap();
            let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
            b.write_at(0, &data).unwrap();
            b.flush().unwrap();
        }
        create_with(
            &top,
            &opts(None, Some(("base.qcow2".into(), Some(Format::Qcow2)))),
        )
        .unwrap();
        {
            let mut t = crate::open(&top, Some(Format::Qcow2), false).unwrap();
            t.write_at(6000, &[0xee; 5000]).unwrap(); // allocates clusters 1 and 2 here
            t.write_zeroes(12288, 4096).unwrap(); // cluster 3 reads as zeros
            t.flush().unwrap();
        }
        let mut d = crate::open(&top, Some(Format::Qcow2), true).unwrap();
        // Just written, so in the page cache: served in full, and the same bytes as the
        // full read (overlay data, a zero cluster, backing data, unallocated past the
        // backing's data), buffers straddling clusters.
        let (mut a, mut b, mut c) = (vec![0u8; 3000], vec![0u8; 9000], vec![0u8; 70000]);
        let mut bufs = [
            std::io::IoSliceMut::new(&mut a),
            std::io::IoSliceMut::new(&mut b),
            std::io::IoSliceMut::new(&mut c),
        ];
        assert!(d.try_read_vectored_at(1000, &mut bufs));
        let mut want = vec![0u8; 82000];
        d.read_at(1000, &mut want).unwrap();
        assert_eq!([a, b, c].concat(), want);
        assert!(want.contains(&0xee) && want.iter().any(|&x| x != 0 && x != 0xee));
        // Out of range: left to the full read, which reports it.
        let mut tail = [0u8; 512];
        assert!(
            !d.try_read_vectored_at((1 << 20) - 256, &mut [std::io::IoSliceMut::new(&mut tail)])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_that_would_need_the_disk_is_not_tried() {
        // MemStorage cannot promise a read without waiting: with no L2 table cached,
        // nothing is served, and the full read still works.
        let mut q = in_memory("mem", 1 << 20);
        q.write_at(0, &[7; 4096]).unwrap();
        q.l2 = L2Cache::new(4, (q.cs() / 8) as usize);
        let mut buf = [0u8; 4096];
        assert!(!q.try_read_vectored_at(0, &mut [std::io::IoSliceMut::new(&mut buf)]));
        q.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [7; 4096]);
        // The table is cached now, but the data cluster is still in MemStorage.
        assert!(!q.try_read_vectored_at(0, &mut [std::io::IoSliceMut::new(&mut buf)]));
        // A never-written cluster of an image without a backing file reads as zeros.
        let mut hole = [1u8; 4096];
        assert!(q.try_read_vectored_at(65536 * 3, &mut [std::io::IoSliceMut::new(&mut hole)]));
        assert_eq!(hole, [0; 4096]);
    }

    #[test]
    fn the_l2_cache_is_bounded_for_huge_images() {
        assert_eq!(l2_cache_tables(0, 65536), 1);
        assert_eq!(l2_cache_tables(40, 65536), 40);
        // 32 MiB of 64 KiB tables.
        assert_eq!(l2_cache_tables(1 << 20, 65536), 512);
        assert_eq!(l2_cache_tables(1 << 20, 512), 65536);
    }
}
