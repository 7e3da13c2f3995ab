//! virtio-blk over a `block::BlockBackend` (raw or qcow2): read, write, flush, get-id,
//! discard and write-zeroes; read-only disks refuse writes.
//!
//! Requests are served in two steps so the device lock is never held across disk I/O:
//! under the lock every chain waiting on the ring is popped and checked into a
//! `Request` (guest addresses, a disk offset, where the status byte goes); then, with
//! the lock released, the requests run against the disk, reading and writing guest RAM in
//! place (`preadv`/`pwritev` on iovecs that point into it for raw images), and the
//! transport publishes their completions together, with at most one interrupt.
//! Reads and writes take the disk's shared path ([`block::SharedIo`]) and not the
//! disk's lock, so the batches of several queues (a multi-queue disk, each vCPU on its
//! own) run at once: a raw image's take no lock at all, a qcow2 image's take its table
//! lock only to look up clusters not yet looked up, and to allocate. Flushes, discards
//! and write-zeroes take the disk's lock.
//! VIRTIO_RING_F_EVENT_IDX is offered: the driver kicks only when it passes the
//! avail_event we publish after each batch, and we interrupt only when used_event asks.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{BlockBackend, BlockError, SharedIo};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::queue::Chain;
use crate::rate_limiter::RateLimiter;
use crate::{
    device_type, read_config_bytes, DeviceError, QueueOutcome, QueueWork, Started, VirtioDevice,
    WorkDone, VIRTIO_RING_F_EVENT_IDX,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio spec 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// The config space's `num_queues` says how many request queues there are.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
const SEG_MAX: u32 = 126;
const HEADER_BYTES: u64 = 16;
/// Discard/write-zeroes segment lists are copied out of the guest: bound them (256
/// segments; the config space advertises one).
const MAX_DISCARD_PAYLOAD: u64 = 4096;

pub struct Block {
    /// Its own lock, not the device's: requests run against it after the device lock is
    /// released.
    disk: Arc<Disk>,
    id: [u8; ID_BYTES],
    read_only: bool,
    /// In bytes; shared with [`BlockHandle`], which changes it with the backing file.
    capacity: Arc<AtomicU64>,
    config: Vec<u8>,
    limiter: Arc<Mutex<RateLimiter>>,
    counters: Arc<BlockCounters>,
    inline_writes: Arc<InlineWrites>,
    /// One size per request queue: several with VIRTIO_BLK_F_MQ ([`Block::with_queues`]).
    queue_sizes: Vec<u16>,
}

/// A disk's backend and, where the backend has one, the path its reads and writes take
/// without the backend's lock ([`BlockBackend::shared_io`], raw and qcow2): requests of
/// several queues, served by several threads, then run at the same time.
#[derive(Debug)]
struct Disk {
    backend: Mutex<Box<dyn BlockBackend>>,
    /// The backend's shared path, swapped with it (under its lock).
    shared: Mutex<Option<Arc<dyn SharedIo>>>,
}

impl Disk {
    fn new(backend: Box<dyn BlockBackend>) -> Self {
        Disk {
            shared: Mutex::new(backend.shared_io()),
            backend: Mutex::new(backend),
        }
    }

    fn backend(&self) -> std::sync::MutexGuard<'_, Box<dyn BlockBackend>> {
        // A panic in a backend is a bug already reported; its state is the best there is.
        self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend, unless someone holds it: they may be doing I/O.
    fn try_backend(&self) -> Option<std::sync::MutexGuard<'_, Box<dyn BlockBackend>>> {
        self.backend.try_lock().ok()
    }

    /// The shared path of the backend serving now, if it has one.
    fn shared(&self) -> Option<Arc<dyn SharedIo>> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves from `backend` from now on; requests already running finish on the old
    /// one (those on its shared path keep it alive until they do).
    fn replace(&self, backend: Box<dyn BlockBackend>) {
        let mut b = self.backend();
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = backend.shared_io();
        *b = backend;
    }
}

/// The most request queues a disk offers (Linux maps at most one per CPU).
pub const MAX_QUEUES: u16 = 16;

/// Writes up to this size may be served on the notifying vCPU ([`InlineWrites`]).
const INLINE_WRITE_MAX: u64 = 64 << 10;
/// After a write on a vCPU had to sleep, writes go to the I/O thread this long.
const INLINE_WRITE_PAUSE: Duration = Duration::from_secs(1);

/// Whether small writes are served on the notifying vCPU, as reads from the page cache
/// are. No host has a non-blocking buffered write to try first (ext4 refuses
/// RWF_NOWAIT for them), but a small write to a raw image
/// ([`BlockBackend::writes_in_place`]), or to clusters a qcow2 image has allocated
/// ([`SharedIo::try_write_vectored_at`]), is a copy into the page cache, a few
/// microseconds, where waking the I/O thread and later the halted vCPU costs two thread
/// wake-ups per request. A host that makes a write wait (dirty-page throttling, a
/// journal commit, a page fault on guest memory) puts the thread to sleep, which the
/// thread's voluntary context switches show (its wall time would also count the host
/// preempting it): after one such write, writes go to the I/O thread for a while, so the
/// guest stalls at most once per pause.
#[derive(Debug)]
struct InlineWrites {
    since: Instant,
    /// Nanoseconds after `since` before which writes go to the I/O thread.
    paused_until: AtomicU64,
}

impl InlineWrites {
    fn new() -> Self {
        InlineWrites {
            since: Instant::now(),
            paused_until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a write of `len` bytes may be served on the vCPU now.
    fn allowed(&self, len: u64) -> bool {
        len <= INLINE_WRITE_MAX && self.now() >= self.paused_until.load(Ordering::Relaxed)
    }

    /// An inline write ran while the thread's voluntary context switches went from
    /// `before` to `after` ([`voluntary_switches`]).
    fn done(&self, before: Option<i64>, after: Option<i64>) {
        // A thread whose count cannot be read is treated as one that slept.
        if before.is_none() || before != after {
            tracing::debug!("a write on the vCPU slept: writes go to the I/O thread");
            let until = self
                .now()
                .saturating_add(INLINE_WRITE_PAUSE.as_nanos() as u64);
            self.paused_until.store(until, Ordering::Relaxed);
        }
    }
}

/// The calling thread's voluntary context switches so far (times it slept).
fn voluntary_switches() -> Option<i64> {
    // SAFETY: rusage is plain integers (timevals and counts): all zeros is a value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a pointer to a writable rusage that outlives the call.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (r == 0).then_some(usage.ru_nvcsw)
}

/// What a disk served, for metrics (Firecracker's `block` group names): requests that
/// completed successfully and their bytes.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_count: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_count: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_count: AtomicU64,
}

/// What the VMM keeps of a disk to change it while the guest runs: its backing file
/// (swapped under the disk's lock, so requests in flight finish on the old one) and its
/// rate limiter. After [`BlockHandle::replace_backend`] the transport must tell the
/// driver its configuration changed (the capacity).
#[derive(Clone)]
pub struct BlockHandle {
    disk: Arc<Disk>,
    capacity: Arc<AtomicU64>,
    limiter: Arc<Mutex<RateLimiter>>,
    counters: Arc<BlockCounters>,
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHandle")
            .field("capacity", &self.capacity.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl BlockHandle {
    /// Serves the disk from `backend` from now on; returns the new capacity in bytes.
    pub fn replace_backend(&self, backend: Box<dyn BlockBackend>) -> u64 {
        let bytes = backend.size() / SECTOR_SIZE * SECTOR_SIZE;
        self.disk.replace(backend);
        self.capacity.store(bytes, Ordering::Release);
        bytes
    }

    /// What the disk has served.
    pub fn counters(&self) -> &BlockCounters {
        &self.counters
    }

    /// The disk's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// The disk's rate limiter, to update.
    pub fn limiter(&self) -> &Arc<Mutex<RateLimiter>> {
        &self.limiter
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// A run of guest memory a request reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// What a checked request does once the device lock is released.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        data: Vec<Segment>,
    },
    Write {
        offset: u64,
        data: Vec<Segment>,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
        len: usize,
    },
    Zero {
        discard: bool,
        ranges: Vec<(u64, u64)>,
    },
    /// Answered without touching the disk (out of range, read-only, unsupported).
    Status(u8),
}

/// One request popped off the ring.
#[derive(Debug)]
struct Request {
    head: u16,
    op: Op,
    status_at: GuestAddress,
}

/// The bytes `[skip, skip + len)` of the buffer the descriptors describe, as segments.
fn window(descs: &[virtio_queue::desc::split::Descriptor], skip: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(descs.len());
    let (mut skip, mut left) = (skip, len);
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len());
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(left);
        // Chain::collect checked each descriptor lies in guest memory, so no overflow.
        out.push(Segment {
            addr: d.addr().unchecked_add(skip),
            len: n,
        });
        left -= n;
        skip = 0;
    }
    out
}

fn total(descs: &[virtio_queue::desc::split::Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// Copy the (small, bounded by the caller) bytes of `segs` out of guest memory.
fn copy_out(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<Vec<u8>, DeviceError> {
    let mut out = Vec::new();
    for s in segs {
        let at = out.len();
        out.resize(at + s.len as usize, 0);
        mem.read_slice(&mut out[at..], s.addr)
            .map_err(|_| DeviceError::GuestMemory(s.addr.0))?;
    }
    Ok(out)
}

/// Host views of the guest memory behind `segs` (split where a segment crosses memory
/// regions), as raw pointer and length.
fn host_ranges(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<Vec<(*mut u8, usize)>, u64> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| s.addr.0)?;
        for slice in mem.get_slices(s.addr, len) {
            let slice = slice.map_err(|_| s.addr.0)?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

impl Block {
    /// `id` is what GET_ID returns (the disk's serial, e.g. the image file name).
    pub fn new(disk: Box<dyn BlockBackend>, id: &str, read_only: bool) -> Self {
        let read_only = read_only || disk.read_only();
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        let sectors = disk.size() / SECTOR_SIZE;
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // One discard/write-zeroes segment of up to 32 MiB at a time.
        let max_sectors = (32u32 << 20) / SECTOR_SIZE as u32;
        config[36..40].copy_from_slice(&max_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&1u32.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&max_sectors.to_le_bytes());
        config[52..56].copy_from_slice(&1u32.to_le_bytes());
        config[56] = 1;
        Block {
            capacity: Arc::new(AtomicU64::new(sectors * SECTOR_SIZE)),
            disk: Arc::new(Disk::new(disk)),
            id: idb,
            read_only,
            config,
            limiter: Arc::default(),
            counters: Arc::default(),
            inline_writes: Arc::new(InlineWrites::new()),
            queue_sizes: vec![QUEUE_SIZE],
        }
    }

    /// Offers `queues` request queues (VIRTIO_BLK_F_MQ when more than one, QEMU's
    /// `num-queues`): a guest with several CPUs gives each CPU (or group of them) its own
    /// queue, so CPUs submit without sharing a ring. Clamped to 1..=[`MAX_QUEUES`].
    pub fn with_queues(mut self, queues: u16) -> Self {
        let n = queues.clamp(1, MAX_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(n)];
        self.config[34..36].copy_from_slice(&n.to_le_bytes());
        self
    }

    /// Serves requests within `limiter`'s budget (Firecracker's `rate_limiter`).
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Arc::new(Mutex::new(limiter));
        self
    }

    /// The handle to change this disk while the guest runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            disk: self.disk.clone(),
            capacity: self.capacity.clone(),
            limiter: self.limiter.clone(),
            counters: self.counters.clone(),
        }
    }

    fn in_range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        (off.checked_add(len)? <= self.capacity.load(Ordering::Acquire)).then_some(off)
    }

    /// Check one chain into a request. Err only for malformed chains (the device then
    /// needs reset); a request the disk cannot serve gets an error status instead.
    fn parse(&self, mem: &GuestMemoryMmap, chain: &Chain) -> Result<Request, DeviceError> {
        let readable = total(&chain.readable);
        if readable < HEADER_BYTES {
            return Err(DeviceError::BadRequest(
                "request header shorter than 16 bytes",
            ));
        }
        let Some(status_desc) = chain.writable.last() else {
            return Err(DeviceError::BadRequest("no writable status byte"));
        };
        if status_desc.len() == 0 {
            return Err(DeviceError::BadRequest("empty status descriptor"));
        }
        let status_at = status_desc
            .addr()
            .checked_add(u64::from(status_desc.len()) - 1)
            .ok_or(DeviceError::GuestMemory(status_desc.addr().0))?;
        let header = copy_out(mem, &window(&chain.readable, 0, HEADER_BYTES))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        // Driver-readable bytes after the header, device-writable ones before the status.
        let out_len = readable - HEADER_BYTES;
        let in_len = total(&chain.writable) - 1;

        let op = match kind {
            T_IN => match self.in_range(sector, in_len) {
                Some(offset) if in_len.is_multiple_of(SECTOR_SIZE) => Op::Read {
                    offset,
                    data: window(&chain.writable, 0, in_len),
                },
                _ => Op::Status(S_IOERR),
            },
            T_OUT => match self.in_range(sector, out_len) {
                _ if self.read_only => Op::Status(S_IOERR),
                Some(offset) if out_len.is_multiple_of(SECTOR_SIZE) => Op::Write {
                    offset,
                    data: window(&chain.readable, HEADER_BYTES, out_len),
                },
                _ => Op::Status(S_IOERR),
            },
            T_FLUSH => Op::Flush,
            T_GET_ID => Op::GetId {
                data: window(&chain.writable, 0, in_len),
                len: (in_len as usize).min(ID_BYTES),
            },
            T_DISCARD | T_WRITE_ZEROES if self.read_only => Op::Status(S_IOERR),
            T_DISCARD | T_WRITE_ZEROES => {
                if out_len == 0 || out_len > MAX_DISCARD_PAYLOAD || !out_len.is_multiple_of(16) {
                    Op::Status(S_IOERR)
                } else {
                    let payload = copy_out(mem, &window(&chain.readable, HEADER_BYTES, out_len))?;
                    self.zero_ranges(kind == T_DISCARD, &payload)
                }
            }
            _ => Op::Status(S_UNSUPP),
        };
        Ok(Request {
            head: chain.head,
            op,
            status_at,
        })
    }

    fn zero_ranges(&self, discard: bool, payload: &[u8]) -> Op {
        let mut ranges = Vec::with_capacity(payload.len() / 16);
        for seg in payload.chunks_exact(16) {
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let count = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
            let len = count * SECTOR_SIZE;
            let Some(off) = self.in_range(sector, len) else {
                return Op::Status(S_IOERR);
            };
            ranges.push((off, len));
        }
        Op::Zero { discard, ranges }
    }

    /// Pop every chain waiting on the queue and check it (device lock held), as far as
    /// the rate limiter lets: a request it stops is given back to the ring.
    fn take(&self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Batch, DeviceError> {
        let mut requests = Vec::new();
        let mut throttled = None;
        let size = queue.size();
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let limited = limiter.is_limited();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let request = self.parse(mem, &chain)?;
            if limited {
                // Firecracker's accounting: one operation, and the data moved.
                let bytes = match &request.op {
                    Op::Read { data, .. } | Op::Write { data, .. } => {
                        data.iter().map(|s| s.len).sum()
                    }
                    _ => 0,
                };
                if let Err(wait) = limiter.consume(1, bytes) {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    throttled = Some(wait);
                    break;
                }
            }
            requests.push(request);
        }
        Ok(Batch {
            disk: self.disk.clone(),
            id: self.id,
            requests,
            throttled,
            counters: self.counters.clone(),
            inline_writes: self.inline_writes.clone(),
        })
    }
}

/// Requests taken off the ring, to run without the device lock.
struct Batch {
    disk: Arc<Disk>,
    id: [u8; ID_BYTES],
    requests: Vec<Request>,
    /// The rate limiter stopped the batch with requests left on the ring.
    throttled: Option<std::time::Duration>,
    counters: Arc<BlockCounters>,
    inline_writes: Arc<InlineWrites>,
}

impl Batch {
    /// Run one request if it needs no waiting on the host: a read served from the page
    /// cache, a small write to a raw image ([`InlineWrites`]), an ID, a status. None when
    /// it would wait (or is a flush, discard, a large write, a write to an image with
    /// metadata). `shared`: the disk's shared path ([`Disk::shared`]).
    fn try_one(
        &self,
        mem: &GuestMemoryMmap,
        op: &Op,
        shared: Option<&dyn SharedIo>,
    ) -> Option<Result<(u8, u32), DeviceError>> {
        let Op::Read { offset, data } = op else {
            return match op {
                Op::GetId { .. } | Op::Status(_) => Some(self.run_one(mem, op, shared)),
                Op::Write { offset, data }
                    if self.inline_writes.allowed(data.iter().map(|s| s.len).sum()) =>
                {
                    let before = voluntary_switches();
                    let r = match shared {
                        Some(io) => {
                            // A write that would allocate (qcow2) goes to the I/O thread.
                            let mut declined = false;
                            let r = write(mem, *offset, data, |b| {
                                io.try_write_vectored_at(*offset, b).unwrap_or_else(|| {
                                    declined = true;
                                    Ok(())
                                })
                            });
                            if declined {
                                return None;
                            }
                            r
                        }
                        None => {
                            // Never wait for the disk's lock: whoever holds it may be
                            // doing I/O.
                            let mut disk = self.disk.try_backend()?;
                            if !disk.writes_in_place() {
                                return None;
                            }
                            write(mem, *offset, data, |b| disk.write_vectored_at(*offset, b))
                        }
                    };
                    self.inline_writes.done(before, voluntary_switches());
                    Some(r)
                }
                _ => None,
            };
        };
        let ranges = match host_ranges(mem, data) {
            Ok(r) => r,
            Err(at) => return Some(Err(DeviceError::GuestMemory(at))),
        };
        let mut bufs: Vec<IoSliceMut<'_>> = ranges
            .iter()
            .map(|&(p, n)| {
                // SAFETY: as in `run_one`'s reads: `p` and `n` come from a VolatileSlice
                // of `mem`, alive for this borrow; only the backend writes through it.
                IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) })
            })
            .collect();
        let done = match shared {
            Some(io) => io.try_read_vectored_at(*offset, &mut bufs),
            // Never wait for the disk's lock either: whoever holds it may be doing I/O.
            None => self
                .disk
                .try_backend()?
                .try_read_vectored_at(*offset, &mut bufs),
        };
        // Reported even when not done: part of the buffers may have been filled.
        for s in data {
            crate::ram_watch::wrote(s.addr.0, s.len);
        }
        if !done {
            return None;
        }
        let len: u64 = data.iter().map(|s| s.len).sum();
        Some(Ok((S_OK, u32::try_from(len).unwrap_or(u32::MAX))))
    }

    /// Run one request; returns its status and the bytes it wrote into guest buffers.
    /// Reads and writes take the disk's shared path when it has one (`shared`).
    fn run_one(
        &self,
        mem: &GuestMemoryMmap,
        op: &Op,
        shared: Option<&dyn SharedIo>,
    ) -> Result<(u8, u32), DeviceError> {
        // What failed is only formatted when something did.
        let status = |r: Result<(), BlockError>, what: &dyn Fn() -> String| match r {
            Ok(()) => S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk {}: {e}", what());
                S_IOERR
            }
        };
        Ok(match op {
            Op::Read { offset, data } => {
                let ranges = host_ranges(mem, data).map_err(DeviceError::GuestMemory)?;
                let mut bufs: Vec<IoSliceMut<'_>> = ranges
                    .iter()
                    .map(|&(p, n)| {
                        // SAFETY: `p` and `n` come from a VolatileSlice of `mem`, which keeps
                        // the mapping alive for this borrow. The guest may touch the same
                        // bytes meanwhile (it owns them, as with a DMA target); Rust code
                        // reads nothing through these slices, the backend only fills them.
                        IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) })
                    })
                    .collect();
                let r = match shared {
                    Some(io) => io.read_vectored_at(*offset, &mut bufs),
                    None => self.disk.backend().read_vectored_at(*offset, &mut bufs),
                };
                // Before the used ring publishes it: a guest that sees the data may run it
                // (reported even after a failure, which may have filled part of it).
                for s in data {
                    crate::ram_watch::wrote(s.addr.0, s.len);
                }
                let len: u64 = data.iter().map(|s| s.len).sum();
                match status(r, &|| format!("read at {offset:#x}")) {
                    S_OK => (S_OK, u32::try_from(len).unwrap_or(u32::MAX)),
                    s => (s, 0),
                }
            }
            Op::Write { offset, data } => match shared {
                Some(io) => write(mem, *offset, data, |b| io.write_vectored_at(*offset, b))?,
                None => write(mem, *offset, data, |b| {
                    self.disk.backend().write_vectored_at(*offset, b)
                })?,
            },
            Op::Flush => (status(self.disk.backend().flush(), &|| "flush".into()), 0),
            Op::GetId { data, len } => {
                let mut left = &self.id[..*len];
                for s in data {
                    let n = (s.len as usize).min(left.len());
                    mem.write_slice(&left[..n], s.addr)
                        .map_err(|_| DeviceError::GuestMemory(s.addr.0))?;
                    crate::ram_watch::wrote(s.addr.0, n as u64);
                    left = &left[n..];
                }
                (S_OK, *len as u32)
            }
            Op::Zero { discard, ranges } => {
                let mut disk = self.disk.backend();
                let mut st = S_OK;
                for &(off, len) in ranges {
                    let r = if *discard {
                        disk.discard(off, len)
                    } else {
                        disk.write_zeroes(off, len)
                    };
                    st = status(r, &|| format!("discard/write-zeroes at {off:#x}"));
                    if st != S_OK {
                        break;
                    }
                }
                (st, 0)
            }
            Op::Status(s) => (*s, 0),
        })
    }
}

/// Writes the guest buffers `data` at `offset` with `to_disk`: the status and the bytes
/// written into guest buffers (none).
fn write(
    mem: &GuestMemoryMmap,
    offset: u64,
    data: &[Segment],
    to_disk: impl FnOnce(&[IoSlice<'_>]) -> Result<(), BlockError>,
) -> Result<(u8, u32), DeviceError> {
    let ranges = host_ranges(mem, data).map_err(DeviceError::GuestMemory)?;
    let bufs: Vec<IoSlice<'_>> = ranges
        .iter()
        .map(|&(p, n)| {
            // SAFETY: `p` and `n` come from a VolatileSlice of `mem`, which keeps the
            // mapping alive for this borrow; the backend only reads these bytes (the
            // guest may change them meanwhile, as with a DMA source).
            IoSlice::new(unsafe { std::slice::from_raw_parts(p.cast_const(), n) })
        })
        .collect();
    match to_disk(&bufs) {
        Ok(()) => Ok((S_OK, 0)),
        Err(e) => {
            tracing::warn!("virtio-blk write at {offset:#x}: {e}");
            Ok((S_IOERR, 0))
        }
    }
}

impl Batch {
    fn count(&self, op: &Op) {
        let c = &self.counters;
        let bytes = |d: &[Segment]| d.iter().map(|s| s.len).sum::<u64>();
        match op {
            Op::Read { data, .. } => {
                c.read_count.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(bytes(data), Ordering::Relaxed);
            }
            Op::Write { data, .. } => {
                c.write_count.fetch_add(1, Ordering::Relaxed);
                c.write_bytes.fetch_add(bytes(data), Ordering::Relaxed);
            }
            Op::Flush => {
                c.flush_count.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl Batch {
    /// Writes a finished request's status byte and counts it; the used length.
    fn finish(
        &self,
        mem: &GuestMemoryMmap,
        req: &Request,
        result: Result<(u8, u32), DeviceError>,
    ) -> Result<u32, DeviceError> {
        let (status, written) = result?;
        mem.write_obj(status, req.status_at)
            .map_err(|_| DeviceError::GuestMemory(req.status_at.0))?;
        if status == S_OK {
            self.count(&req.op);
        }
        Ok(written.saturating_add(1))
    }
}

impl QueueWork for Batch {
    fn run(self: Box<Self>, mem: &GuestMemoryMmap) -> WorkDone {
        let mut done = WorkDone {
            throttled: self.throttled,
            ..WorkDone::default()
        };
        let shared = self.disk.shared();
        for req in &self.requests {
            match self.finish(mem, req, self.run_one(mem, &req.op, shared.as_deref())) {
                Ok(len) => done.used.push((req.head, len)),
                Err(e) => {
                    done.error = Some(e);
                    break;
                }
            }
        }
        done
    }

    fn run_nowait(&mut self, mem: &GuestMemoryMmap) -> WorkDone {
        let mut done = WorkDone::default();
        let mut served = 0;
        let shared = self.disk.shared();
        for req in &self.requests {
            let Some(result) = self.try_one(mem, &req.op, shared.as_deref()) else {
                break;
            };
            served += 1;
            done.at_halt |= matches!(req.op, Op::Write { .. });
            match self.finish(mem, req, result) {
                Ok(len) => done.used.push((req.head, len)),
                Err(e) => {
                    // The device needs a reset: nothing after it runs.
                    done.error = Some(e);
                    served = self.requests.len();
                    break;
                }
            }
        }
        self.requests.drain(..served);
        if self.requests.is_empty() {
            done.throttled = self.throttled.take();
        }
        done
    }

    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_EVENT_IDX;
        if self.queue_sizes.len() > 1 {
            f |= VIRTIO_BLK_F_MQ;
        }
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn moderate_interrupts(&self, _index: usize) -> bool {
        true
    }

    fn serves_nowait(&self) -> bool {
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The capacity as it is now: a swapped backing file may have changed it.
        let mut config = self.config.clone();
        let sectors = self.capacity.load(Ordering::Acquire) / SECTOR_SIZE;
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn start_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Started, DeviceError> {
        Ok(Started::Unlocked(Box::new(self.take(queue, mem)?)))
    }

    /// The whole round on this thread (for callers without a transport).
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let batch = Box::new(self.take(queue, mem)?);
        let done = batch.run(mem);
        for &(head, len) in &done.used {
            queue
                .add_used(mem, head, len)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
        }
        if let Some(e) = done.error {
            return Err(e);
        }
        Ok(QueueOutcome {
            used: !done.used.is_empty(),
            throttled: done.throttled,
            ..QueueOutcome::default()
        })
    }
}
