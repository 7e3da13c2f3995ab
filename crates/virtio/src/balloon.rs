//! virtio-balloon (virtio 1.x, device type 5): the host sets a target size in 4 KiB pages
//! in the config space; the driver inflates (gives the host pages it will not touch) or
//! deflates towards it and reports its size in `actual`.
//!
//! - inflate queue: arrays of 32-bit page frame numbers. Each page that lies wholly in
//!   guest RAM is discarded with `madvise(MADV_DONTNEED)`: guest RAM is private anonymous
//!   memory, so the host frees it and the next touch reads zeros. Frames outside RAM (the
//!   firmware's region, holes, past the end) are counted and skipped.
//! - deflate queue: nothing to do (VIRTIO_BALLOON_F_MUST_TELL_HOST is not offered, so the
//!   driver may use a page again before telling; a discarded page reads as zeros).
//! - stats queue (VIRTIO_BALLOON_F_STATS_VQ, offered when a polling interval was set):
//!   the driver posts a buffer of (tag, value) pairs; the device keeps it and gives it
//!   back each interval, which makes the driver post fresh figures.
//! - VIRTIO_BALLOON_F_DEFLATE_ON_OOM: offered when asked; the guest then deflates under
//!   memory pressure on its own.
//!
//! The host side ([`BalloonHandle`]) changes the target and the polling interval and
//! reads the statistics; the VMM tells the driver of a new target with a configuration
//! change interrupt and of a poll due now by notifying the stats queue.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::queue::Chain;
use crate::{device_type, DeviceError, QueueOutcome, VirtioDevice};

/// The driver must tell the host before it uses a deflated page (not offered).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// A statistics queue exists.
pub const F_STATS_VQ: u64 = 1 << 1;
/// The guest deflates under memory pressure.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;

/// The queues, in the spec's order.
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const STATS_QUEUE: usize = 2;

/// The balloon's page: 4 KiB whatever the host's or the guest's page size.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

const QUEUE_SIZE: u16 = 256;

/// One statistic in the stats buffer: a 16-bit tag and a 64-bit value, packed.
const STAT_LEN: usize = 10;
/// The tags the spec defines (0 to 15, Linux 6.12's included); others are ignored.
pub const STAT_TAGS: usize = 16;
/// The most bytes of a stats buffer read: every tag several times over.
const STATS_MAX_BYTES: usize = 4 * STAT_TAGS * STAT_LEN;

/// Firecracker's names for the statistics, by tag.
pub const STAT_NAMES: [&str; STAT_TAGS] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// What the host and the device share.
#[derive(Debug, Default)]
struct Shared {
    /// The target size in pages (config `num_pages`).
    target_pages: u32,
    /// The size the driver reports (config `actual`).
    actual_pages: u32,
    /// The statistics polling interval; zero when statistics are off.
    interval: Duration,
    /// The last value of each statistic the driver sent.
    stats: [Option<u64>; STAT_TAGS],
    /// When the driver last sent statistics.
    stats_at: Option<Instant>,
    /// Give the held stats buffer back at the next look, whatever the interval says.
    poll_now: bool,
    /// Pages discarded, pages the driver asked back, and frames refused (outside RAM).
    inflated: u64,
    deflated: u64,
    bad_frames: u64,
}

/// The host's side of a balloon device.
#[derive(Clone, Debug, Default)]
pub struct BalloonHandle(Arc<Mutex<Shared>>);

/// What [`BalloonHandle::stats`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    /// By tag; None for a statistic the driver never sent.
    pub values: [Option<u64>; STAT_TAGS],
    /// How long ago the driver last sent statistics.
    pub age: Option<Duration>,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub bad_frames: u64,
}

impl BalloonHandle {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the target size; the caller then tells the driver (a configuration change).
    pub fn set_target_pages(&self, pages: u32) {
        self.lock().target_pages = pages;
    }

    /// Sets the statistics polling interval and asks for figures at the next look at
    /// the stats queue (the caller notifies it). Only meaningful on a device that
    /// offers the stats queue.
    pub fn set_interval(&self, interval: Duration) {
        let mut s = self.lock();
        s.interval = interval;
        s.poll_now = true;
    }

    pub fn stats(&self) -> BalloonStats {
        let s = self.lock();
        BalloonStats {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            values: s.stats,
            age: s.stats_at.map(|t| t.elapsed()),
            inflated_pages: s.inflated,
            deflated_pages: s.deflated,
            bad_frames: s.bad_frames,
        }
    }
}

/// What a snapshot keeps of a balloon: the sizes and counters, the polling interval the
/// host set last, and the statistics buffer the device holds (its driver waits for it
/// back, and posts no other).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub stats_interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_head: Option<u16>,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub bad_frames: u64,
}

/// The device.
#[derive(Debug)]
pub struct Balloon {
    shared: BalloonHandle,
    features: u64,
    /// Guest RAM as (guest-physical start, length): the only memory inflation discards.
    ram: Vec<(u64, u64)>,
    /// The stats buffer the driver posted, kept until a poll is due.
    stats_head: Option<u16>,
    /// When the held stats buffer goes back.
    next_poll: Option<Instant>,
    host_page: u64,
}

impl Balloon {
    /// A balloon of `target_pages` over guest RAM `ram`; statistics polled every
    /// `stats_interval` (zero: no stats queue), DEFLATE_ON_OOM offered if asked.
    pub fn new(
        ram: Vec<(u64, u64)>,
        target_pages: u32,
        deflate_on_oom: bool,
        stats_interval: Duration,
    ) -> Self {
        let mut features = 0;
        if !stats_interval.is_zero() {
            features |= F_STATS_VQ;
        }
        if deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        let shared = BalloonHandle::default();
        {
            let mut s = shared.lock();
            s.target_pages = target_pages;
            s.interval = stats_interval;
        }
        // SAFETY: sysconf has no memory effects.
        let host_page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as u64,
            _ => PAGE_SIZE,
        };
        Balloon {
            shared,
            features,
            ram,
            stats_head: None,
            next_poll: None,
            host_page,
        }
    }

    pub fn handle(&self) -> BalloonHandle {
        self.shared.clone()
    }

    /// Whether the device has a stats queue.
    pub fn has_stats_queue(&self) -> bool {
        self.features & F_STATS_VQ != 0
    }

    /// The RAM range a page frame lies wholly in.
    fn ram_range_of(&self, pfn: u32) -> Option<(u64, u64)> {
        let gpa = u64::from(pfn) << PAGE_SHIFT;
        self.ram
            .iter()
            .copied()
            .find(|&(start, len)| gpa >= start && gpa + PAGE_SIZE <= start.saturating_add(len))
    }

    /// Serves the inflate queue: each chain's readable bytes are page frame numbers.
    fn inflate(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let size = queue.size();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let mut run: Option<(u64, u64)> = None;
            let (mut good, mut bad) = (0u64, 0u64);
            for d in &chain.readable {
                // Read in pieces: a descriptor may be as long as guest memory.
                let mut buf = [0u8; 4096];
                let len = u64::from(d.len()) & !3;
                let mut at = 0u64;
                while at < len {
                    let n = (len - at).min(buf.len() as u64) as usize;
                    let piece = &mut buf[..n];
                    mem.read_slice(piece, GuestAddress(d.addr().0 + at))
                        .map_err(|_| DeviceError::GuestMemory(d.addr().0 + at))?;
                    for w in piece.chunks_exact(4) {
                        let pfn = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                        let Some(range) = self.ram_range_of(pfn) else {
                            bad += 1;
                            continue;
                        };
                        good += 1;
                        let gpa = u64::from(pfn) << PAGE_SHIFT;
                        // Contiguous frames in one RAM range go in one madvise.
                        run = match run {
                            Some((s, l)) if s + l == gpa && s >= range.0 => {
                                Some((s, l + PAGE_SIZE))
                            }
                            Some((s, l)) => {
                                self.discard(mem, s, l);
                                Some((gpa, PAGE_SIZE))
                            }
                            None => Some((gpa, PAGE_SIZE)),
                        };
                    }
                    at += n as u64;
                }
            }
            if let Some((s, l)) = run {
                self.discard(mem, s, l);
            }
            {
                let mut s = self.shared.lock();
                s.inflated += good;
                s.bad_frames += bad;
            }
            if bad > 0 {
                tracing::warn!(
                    frames = bad,
                    "virtio-balloon: inflate named frames outside guest RAM; skipped"
                );
            }
            queue
                .add_used(mem, chain.head, 0)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            used = true;
        }
        Ok(used)
    }

    /// Gives guest RAM `[gpa, gpa + len)` (checked to lie in one RAM range) back to the
    /// host: the whole host pages within it.
    fn discard(&self, mem: &GuestMemoryMmap, gpa: u64, len: u64) {
        let start = gpa.next_multiple_of(self.host_page);
        let end = (gpa + len) / self.host_page * self.host_page;
        if end <= start {
            return;
        }
        let Some((region, off)) = mem.to_region_addr(GuestAddress(start)) else {
            return;
        };
        // One region holds the whole span, or nothing is done.
        if off
            .0
            .checked_add(end - start)
            .is_none_or(|e| e > region.len())
        {
            return;
        }
        let Ok(host) = region.get_host_address(off) else {
            return;
        };
        // SAFETY: [host, host + end - start) lies within one mapping `mem` owns (checked
        // against the region just above); MADV_DONTNEED on private anonymous memory
        // only drops its pages, which read as zeros afterwards.
        let r = unsafe { libc::madvise(host.cast(), (end - start) as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            tracing::warn!(
                gpa = start,
                len = end - start,
                "virtio-balloon: madvise: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // The contents changed under any code a software CPU compiled from them.
        crate::ram_watch::wrote(start, end - start);
    }

    /// Serves the deflate queue: the frames need nothing, only counting.
    fn deflate(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let size = queue.size();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let bytes: u64 = chain.readable.iter().map(|d| u64::from(d.len())).sum();
            self.shared.lock().deflated += bytes / 4;
            queue
                .add_used(mem, chain.head, 0)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            used = true;
        }
        Ok(used)
    }

    /// Takes new stats buffers (keeping the last, giving back any earlier one) and gives
    /// the kept one back when a poll is due.
    fn stats(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let size = queue.size();
        let mut outcome = QueueOutcome::default();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let mut bytes = Vec::with_capacity(STATS_MAX_BYTES);
            for d in &chain.readable {
                let room = STATS_MAX_BYTES - bytes.len();
                let n = (d.len() as usize).min(room);
                let at = bytes.len();
                bytes.resize(at + n, 0);
                mem.read_slice(&mut bytes[at..], d.addr())
                    .map_err(|_| DeviceError::GuestMemory(d.addr().0))?;
            }
            let mut s = self.shared.lock();
            for e in bytes.chunks_exact(STAT_LEN) {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&e[2..]);
                if let Some(slot) = s.stats.get_mut(usize::from(tag)) {
                    *slot = Some(u64::from_le_bytes(v));
                }
            }
            s.stats_at = Some(Instant::now());
            let interval = s.interval;
            drop(s);
            // A driver that posts a second buffer while one is kept gets the first back.
            if let Some(old) = self.stats_head.replace(chain.head) {
                queue
                    .add_used(mem, old, 0)
                    .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                outcome.used = true;
            }
            self.next_poll = Some(Instant::now() + interval);
        }
        let Some(head) = self.stats_head else {
            return Ok(outcome);
        };
        let mut s = self.shared.lock();
        if s.interval.is_zero() {
            return Ok(outcome);
        }
        let now = Instant::now();
        let due = self.next_poll.is_none_or(|t| t <= now);
        if s.poll_now || due {
            s.poll_now = false;
            drop(s);
            queue
                .add_used(mem, head, 0)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            self.stats_head = None;
            self.next_poll = None;
            outcome.used = true;
        } else if let Some(t) = self.next_poll {
            // Brought back by the I/O thread's timer when the poll is due.
            outcome.throttled = Some(t.saturating_duration_since(now));
        }
        Ok(outcome)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        if self.has_stats_queue() {
            &[QUEUE_SIZE; 3]
        } else {
            &[QUEUE_SIZE; 2]
        }
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.shared.lock();
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&s.target_pages.to_le_bytes());
        config[4..].copy_from_slice(&s.actual_pages.to_le_bytes());
        crate::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4 to 7) is the driver's to write.
        let mut s = self.shared.lock();
        let mut actual = s.actual_pages.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if let Some(slot) = at
                .and_then(|a| a.checked_sub(4))
                .and_then(|a| actual.get_mut(usize::try_from(a).ok()?))
            {
                *slot = *b;
            }
        }
        s.actual_pages = u32::from_le_bytes(actual);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        match index {
            INFLATE_QUEUE => Ok(QueueOutcome {
                used: self.inflate(queue, mem)?,
                ..QueueOutcome::default()
            }),
            DEFLATE_QUEUE => Ok(QueueOutcome {
                used: self.deflate(queue, mem)?,
                ..QueueOutcome::default()
            }),
            STATS_QUEUE if self.has_stats_queue() => self.stats(queue, mem),
            _ => Ok(QueueOutcome::default()),
        }
    }

    fn queues_at_driver_ok(&self) -> Vec<usize> {
        if self.has_stats_queue() {
            vec![STATS_QUEUE]
        } else {
            Vec::new()
        }
    }

    fn device_state(&self) -> Option<crate::DeviceState> {
        let s = self.shared.lock();
        Some(crate::DeviceState::Balloon(BalloonState {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            stats_interval_ms: u64::try_from(s.interval.as_millis()).unwrap_or(u64::MAX),
            stats_head: self.stats_head,
            inflated_pages: s.inflated,
            deflated_pages: s.deflated,
            bad_frames: s.bad_frames,
        }))
    }

    fn restore_device_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        let crate::DeviceState::Balloon(b) = state;
        if let Some(head) = b.stats_head {
            if !self.has_stats_queue() {
                return Err(
                    "a held statistics buffer, but this balloon has no statistics queue".into(),
                );
            }
            if head >= QUEUE_SIZE {
                return Err(format!(
                    "a held statistics buffer at descriptor {head} of a {QUEUE_SIZE}-entry queue"
                ));
            }
        }
        if b.stats_interval_ms != 0 && !self.has_stats_queue() {
            return Err(format!(
                "statistics every {} ms, but this balloon has no statistics queue",
                b.stats_interval_ms
            ));
        }
        let mut s = self.shared.lock();
        s.target_pages = b.target_pages;
        s.actual_pages = b.actual_pages;
        s.interval = Duration::from_millis(b.stats_interval_ms);
        s.inflated = b.inflated_pages;
        s.deflated = b.deflated_pages;
        s.bad_frames = b.bad_frames;
        drop(s);
        self.stats_head = b.stats_head;
        // Due at once: `restored` runs the queue, which gives the buffer back, and the
        // driver posts fresh figures from the restored guest.
        self.next_poll = None;
        Ok(())
    }

    fn restored(&mut self) -> Vec<usize> {
        match self.stats_head {
            Some(_) => vec![STATS_QUEUE],
            None => Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.stats_head = None;
        self.next_poll = None;
        self.shared.lock().actual_pages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_target_and_the_drivers_actual() {
        let mut b = Balloon::new(vec![(0, 1 << 20)], 64, true, Duration::ZERO);
        assert_eq!(b.features(), F_DEFLATE_ON_OOM);
        assert_eq!(b.queue_max_sizes().len(), 2);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(c, [64, 0, 0, 0, 0, 0, 0, 0]);
        b.write_config(4, &20u32.to_le_bytes());
        // The driver cannot move the target; writes past the space are ignored.
        b.write_config(0, &[9, 9, 9, 9]);
        b.write_config(u64::MAX, &[1, 2, 3]);
        b.write_config(6, &[0; 16]);
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 64);
        assert_eq!(u32::from_le_bytes([c[4], c[5], c[6], c[7]]), 20);
        b.handle().set_target_pages(7);
        b.read_config(0, &mut c[..4]);
        assert_eq!(c[0], 7);
        assert_eq!(b.handle().stats().actual_pages, 20);
        let s = Balloon::new(vec![], 0, false, Duration::from_secs(1));
        assert_eq!(s.features(), F_STATS_VQ);
        assert_eq!(s.queue_max_sizes().len(), 3);
    }

    /// A snapshot carries the sizes, the host's interval and the held statistics buffer,
    /// which the restored device gives back first; a state that does not fit the device
    /// is refused with nothing changed.
    #[test]
    fn a_balloon_state_goes_into_a_snapshot_and_back() {
        let mut a = Balloon::new(vec![(0, 1 << 20)], 64, false, Duration::from_secs(1));
        a.write_config(4, &60u32.to_le_bytes());
        a.handle().set_target_pages(128);
        a.handle().set_interval(Duration::from_secs(5));
        a.stats_head = Some(3);
        let state = a.device_state().expect("a balloon keeps state");
        let crate::DeviceState::Balloon(kept) = &state;
        assert_eq!(
            (
                kept.target_pages,
                kept.actual_pages,
                kept.stats_interval_ms,
                kept.stats_head
            ),
            (128, 60, 5000, Some(3))
        );
        // Through the snapshot's JSON.
        let text = serde_json::to_string(&state).unwrap();
        let back: crate::DeviceState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);

        let mut b = Balloon::new(vec![(0, 1 << 20)], 64, false, Duration::from_secs(1));
        b.restore_device_state(&back).unwrap();
        let st = b.handle().stats();
        assert_eq!((st.target_pages, st.actual_pages), (128, 60));
        assert_eq!(b.shared.lock().interval, Duration::from_secs(5));
        assert_eq!(b.stats_head, Some(3));
        assert_eq!(b.restored(), vec![STATS_QUEUE]);

        // Refused: a held buffer or an interval on a balloon without a stats queue, a
        // descriptor past the queue.
        let mut plain = Balloon::new(vec![(0, 1 << 20)], 64, false, Duration::ZERO);
        assert!(plain.restore_device_state(&back).is_err());
        assert_eq!(plain.handle().stats().target_pages, 64);
        let mut bad = kept.clone();
        bad.stats_head = Some(QUEUE_SIZE);
        let mut c = Balloon::new(vec![(0, 1 << 20)], 64, false, Duration::from_secs(1));
        assert!(c
            .restore_device_state(&crate::DeviceState::Balloon(bad))
            .is_err());
        assert_eq!(c.stats_head, None);
        assert!(c.restored().is_empty());
    }

    #[test]
    fn only_frames_wholly_in_ram_are_taken() {
        let b = Balloon::new(
            vec![(0, 0x10_0000), (0x1_0000_0000, 0x2000)],
            0,
            false,
            Duration::ZERO,
        );
        assert!(b.ram_range_of(0).is_some());
        assert!(b.ram_range_of(0xff).is_some());
        assert!(b.ram_range_of(0x100).is_none());
        assert!(b.ram_range_of(0x10_0000).is_some());
        assert!(b.ram_range_of(0x10_0001).is_some());
        assert!(b.ram_range_of(0x10_0002).is_none());
        assert!(b.ram_range_of(u32::MAX).is_none());
    }
}
