//! virtio-net on a host TAP device, with the offloads a Linux guest uses: partial
//! checksums and TCP segmentation both ways, and mergeable receive buffers so a 64 KiB
//! GSO frame from the host fits the guest's page-sized buffers.
//!
//! Frames cross with their 12-byte virtio-net header as the TAP reads and writes it (the
//! kernel's `virtio_net_hdr` layout is the guest's): the device only checks that a header
//! asks for nothing the driver did not negotiate, and fills in `num_buffers` on receive.
//! The TAP is told (TUNSETOFFLOAD) to hand us only the offloads the driver accepted.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::queue::{add_used_batch, gather, scatter, Chain};
use crate::rate_limiter::RateLimiter;
use crate::tap::{offload, Tap, TapError, VNET_HDR_LEN};
use crate::{device_type, read_config_bytes, DeviceError, QueueOutcome, VirtioDevice};

/// The first queue pair's queues. Pair `k` of a multi-queue device has receive queue
/// `2k` and transmit queue `2k + 1`; the control queue follows the last pair.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// The most queue pairs an interface offers (VIRTIO_NET_F_MQ).
pub const MAX_QUEUE_PAIRS: u16 = 8;

/// How long after the driver's first transmit notify its queue is served (an I/O thread's
/// [`crate::transport::IoThread::coalesce`]): frames it queues meanwhile go in the same
/// round, and a guest TCP sender whose buffers are still out coalesces its small writes
/// into large segments instead of one frame per write. QEMU's `tx=timer` waits 150 µs.
/// Only notifies after a round that sent bulk data ([`BULK_FRAME`]) wait: small
/// request/response frames are served at once even when they come back to back.
pub const TX_COALESCE: std::time::Duration = std::time::Duration::from_micros(1000);

/// How long after a bulk frame either way ([`BULK_FRAME`]) the transmit queue's notifies
/// still go to the I/O thread rather than being served on the notifying vCPU: a guest's
/// stream is coalesced there ([`TX_COALESCE`]), and the host's TCP work for the ACKs of
/// a stream to the guest stays off the vCPU. As long as the I/O thread's quiet spell.
pub const TX_STREAMING: std::time::Duration = std::time::Duration::from_micros(10_000);

/// A transmitted frame (virtio-net header included) this large marks its round as bulk
/// ([`crate::QueueOutcome::bulk`]): a TCP stream's segments are MSS-sized or larger.
pub const BULK_FRAME: usize = 1024;

/// Feature bits (virtio spec 5.1.3).
pub mod features {
    /// The device takes frames with partial checksums (the driver's TX).
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with partial checksums (the driver's RX).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The config space advertises an MTU (offered only when one was configured).
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// A control queue (offered with [`MQ`] only: its one command Vessel serves).
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Several queue pairs; the driver says how many it uses on the control queue.
    pub const MQ: u64 = 1 << 22;
}

/// Control queue commands (virtio spec 5.1.6.5): class, command, answer.
mod ctrl {
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
}

/// `virtio_net_hdr` flags and GSO types (virtio spec 5.1.6).
pub mod hdr {
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_ECN: u8 = 0x80;
}

/// What Vessel offers. UFO is left out: Linux no longer sends it and the TAP no longer
/// produces it. With EVENT_IDX the driver kicks only when the device asked for it (after
/// a batch, or once a starved receive queue needs buffers), and is interrupted only
/// when the used index passes what it asked for.
const OFFERED: u64 = crate::VIRTIO_RING_F_EVENT_IDX
    | features::CSUM
    | features::GUEST_CSUM
    | features::MAC
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::GUEST_ECN
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::HOST_ECN
    | features::MRG_RXBUF;

/// Largest frame with its header: a 64 KiB GSO packet, its Ethernet and VLAN headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_536 + 18;

/// The host side of the device: a TAP, or a stand-in in tests.
pub trait NetBackend: Send {
    fn name(&self) -> &str;
    /// Read one frame with its vnet header; Ok(None) when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Send one frame with its vnet header.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Which offloads ([`offload`] flags) frames from `recv` may carry.
    fn set_offload(&mut self, flags: u32) -> Result<(), TapError>;
    /// A descriptor that polls readable when `recv` has a frame.
    fn poll_fd(&self) -> std::io::Result<OwnedFd>;
    /// Whether the host may hand frames to this queue (a multi-queue TAP's queues
    /// beyond those the driver uses are detached, so the kernel steers no flow there).
    fn set_enabled(&mut self, _enabled: bool) -> Result<(), TapError> {
        Ok(())
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        Tap::name(self)
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Tap::recv(self, buf)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        Tap::send(self, frame)
    }
    fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        Tap::set_offload(self, flags)
    }
    fn poll_fd(&self) -> std::io::Result<OwnedFd> {
        self.try_clone_fd()
    }
    fn set_enabled(&mut self, enabled: bool) -> Result<(), TapError> {
        Tap::set_queue_enabled(self, enabled)
    }
}

/// The TUNSETOFFLOAD flags that match what the driver accepted on its receive side.
pub fn tap_offloads(acked: u64) -> u32 {
    // The kernel takes no segmentation offload without partial checksums.
    if acked & features::GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = offload::CSUM;
    if acked & features::GUEST_TSO4 != 0 {
        f |= offload::TSO4;
    }
    if acked & features::GUEST_TSO6 != 0 {
        f |= offload::TSO6;
    }
    if acked & features::GUEST_ECN != 0 && f & (offload::TSO4 | offload::TSO6) != 0 {
        f |= offload::TSO_ECN;
    }
    f
}

/// Whether a header's GSO type is one the negotiated `tso4`/`tso6`/`ecn`/`ufo` allow.
fn gso_allowed(gso_type: u8, acked: u64, tso4: u64, tso6: u64, ecn: u64, ufo: u64) -> bool {
    if gso_type & hdr::GSO_ECN != 0 && acked & ecn == 0 {
        return false;
    }
    match gso_type & !hdr::GSO_ECN {
        hdr::GSO_NONE => gso_type & hdr::GSO_ECN == 0,
        hdr::GSO_TCPV4 => acked & tso4 != 0,
        hdr::GSO_TCPV6 => acked & tso6 != 0,
        hdr::GSO_UDP => acked & ufo != 0,
        _ => false,
    }
}

/// Check a header the driver sent against what it negotiated.
pub fn tx_header_ok(h: &[u8], acked: u64) -> bool {
    let (Some(&flags), Some(&gso)) = (h.first(), h.get(1)) else {
        return false;
    };
    // DATA_VALID and RSC_INFO are the device's to set; the driver never sends them.
    if flags & !hdr::F_NEEDS_CSUM != 0 {
        return false;
    }
    if flags & hdr::F_NEEDS_CSUM != 0 && acked & features::CSUM == 0 {
        return false;
    }
    use features::*;
    gso_allowed(gso, acked, HOST_TSO4, HOST_TSO6, HOST_ECN, HOST_UFO)
}

/// Make a header the TAP produced fit what the driver negotiated; false when the frame
/// needs an offload the driver did not accept (a frame queued before it renegotiated).
pub fn rx_header_fixup(h: &mut [u8], acked: u64) -> bool {
    let (Some(&flags), Some(&gso)) = (h.first(), h.get(1)) else {
        return false;
    };
    if acked & features::GUEST_CSUM == 0 {
        if flags & hdr::F_NEEDS_CSUM != 0 {
            return false;
        }
        // DATA_VALID is only defined once GUEST_CSUM is negotiated.
        h[0] = flags & !hdr::F_DATA_VALID;
    }
    use features::*;
    gso_allowed(gso, acked, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO)
}

/// One receive and transmit queue and the host queue behind them.
struct Pair {
    backend: Box<dyn NetBackend>,
    /// One frame's worth of receive buffer, reused.
    rx_buf: Vec<u8>,
    /// The length of a frame in `rx_buf` that found no guest buffers yet.
    pending: Option<usize>,
    /// Until when the pair counts as streaming: the last bulk frame either way (sent
    /// by the guest, or received from the host), plus [`TX_STREAMING`].
    streaming_until: Option<std::time::Instant>,
    /// Whether the driver uses the pair (the host input polls the TAP queue only then).
    enabled: Arc<AtomicBool>,
}

impl Pair {
    fn new(backend: Box<dyn NetBackend>, enabled: bool) -> Self {
        Pair {
            backend,
            rx_buf: vec![0u8; MAX_FRAME],
            pending: None,
            streaming_until: None,
            enabled: Arc::new(AtomicBool::new(enabled)),
        }
    }
}

pub struct Net {
    /// Queue pair `k` is `pairs[k]`; one unless the device is multi-queue.
    pairs: Vec<Pair>,
    mac: [u8; 6],
    /// Features the driver accepted (0 until FEATURES_OK, and after a reset).
    acked: u64,
    /// The queue sizes: two per pair, and the control queue's with several pairs.
    queue_sizes: Vec<u16>,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    limiters: NetLimiters,
    /// Advertised with VIRTIO_NET_F_MTU (Firecracker's `mtu`).
    mtu: Option<u16>,
}

/// An interface's receive and transmit rate limiters (Firecracker's `rx_rate_limiter`
/// and `tx_rate_limiter`), shared with the VMM so it can change them while the guest runs,
/// and its traffic counters.
#[derive(Debug, Clone, Default)]
pub struct NetLimiters {
    pub rx: Arc<Mutex<RateLimiter>>,
    pub tx: Arc<Mutex<RateLimiter>>,
    pub counters: Arc<NetCounters>,
}

/// Frames and bytes each way (Firecracker's `net` metrics), vnet headers not counted.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: std::sync::atomic::AtomicU64,
    pub rx_bytes: std::sync::atomic::AtomicU64,
    pub tx_packets: std::sync::atomic::AtomicU64,
    pub tx_bytes: std::sync::atomic::AtomicU64,
}

fn lock_limiter(l: &Mutex<RateLimiter>) -> std::sync::MutexGuard<'_, RateLimiter> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.pairs.first().map(|p| p.backend.name()))
            .field("pairs", &self.pairs.len())
            .field("mac", &self.mac)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self::with_backend(Box::new(tap), mac)
    }

    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        Self::with_backends(vec![backend], mac)
    }

    /// A multi-queue device (VIRTIO_NET_F_MQ) with one queue pair per backend (the
    /// queues of a multi-queue TAP, [`Tap::open_queues`]); clamped to
    /// [`MAX_QUEUE_PAIRS`]. Until the driver says how many pairs it uses, only the
    /// first: the other backends are disabled.
    pub fn with_backends(mut backends: Vec<Box<dyn NetBackend>>, mac: [u8; 6]) -> Self {
        backends.truncate(usize::from(MAX_QUEUE_PAIRS));
        let n = backends.len();
        let mut pairs: Vec<Pair> = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| Pair::new(b, i == 0))
            .collect();
        for p in pairs.iter_mut().skip(1) {
            if let Err(e) = p.backend.set_enabled(false) {
                tracing::warn!("virtio-net: {e}");
            }
        }
        let mut queue_sizes = vec![256; 2 * n.max(1)];
        if n > 1 {
            queue_sizes.push(64);
        }
        Net {
            pairs,
            mac,
            acked: 0,
            queue_sizes,
            rx_frames: 0,
            tx_frames: 0,
            rx_dropped: 0,
            tx_dropped: 0,
            limiters: NetLimiters::default(),
            mtu: None,
        }
    }

    /// Advertises `mtu` to the driver (VIRTIO_NET_F_MTU), which then uses it for the
    /// interface. The TAP's own MTU is the host's business, as in Firecracker.
    pub fn with_mtu(mut self, mtu: Option<u16>) -> Self {
        self.mtu = mtu;
        self
    }

    /// Receives and transmits within these limiters.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        self.limiters = NetLimiters {
            rx: Arc::new(Mutex::new(rx)),
            tx: Arc::new(Mutex::new(tx)),
            counters: self.limiters.counters.clone(),
        };
        self
    }

    /// The limiters, to change while the guest runs.
    pub fn limiters(&self) -> NetLimiters {
        self.limiters.clone()
    }

    /// A descriptor that polls readable when the host has frames for the guest (the
    /// first pair's).
    pub fn poll_fd(&self) -> std::io::Result<OwnedFd> {
        self.pairs.first().map_or_else(
            || Err(std::io::ErrorKind::NotFound.into()),
            |p| p.backend.poll_fd(),
        )
    }

    /// How many queue pairs the device has.
    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The host input of queue pair `pair` for an I/O thread: its TAP queue, polled
    /// while the driver uses the pair.
    pub fn host_input(&self, pair: usize) -> std::io::Result<PairInput> {
        let p = self.pairs.get(pair).ok_or(std::io::ErrorKind::NotFound)?;
        Ok(PairInput {
            fd: Some(p.backend.poll_fd()?),
            queue: 2 * pair,
            enabled: p.enabled.clone(),
        })
    }

    /// The control queue's index (after the last pair), when there are several pairs.
    fn ctrl_queue(&self) -> Option<usize> {
        (self.pairs.len() > 1).then_some(2 * self.pairs.len())
    }

    /// True when a received frame waits for guest buffers.
    pub fn rx_blocked(&self) -> bool {
        self.pairs.iter().any(|p| p.pending.is_some())
    }

    /// Lets the host use the first `n` pairs' TAP queues and no others.
    fn use_pairs(&mut self, n: usize) {
        for (i, p) in self.pairs.iter_mut().enumerate() {
            let on = i < n;
            if p.enabled.swap(on, Ordering::AcqRel) != on {
                if let Err(e) = p.backend.set_enabled(on) {
                    tracing::warn!("virtio-net: {e}");
                }
            }
        }
    }

    /// Serves the control queue: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, the one command the
    /// features offered allow; anything else is answered VIRTIO_NET_ERR.
    fn control(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let cmd = gather(mem, &chain.readable, 64)?;
            let answer = match cmd.as_slice() {
                [ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, lo, hi, ..] => {
                    let n = usize::from(u16::from_le_bytes([*lo, *hi]));
                    if (1..=self.pairs.len()).contains(&n) && self.acked & features::MQ != 0 {
                        tracing::debug!(pairs = n, "virtio-net: queue pairs in use");
                        self.use_pairs(n);
                        ctrl::OK
                    } else {
                        ctrl::ERR
                    }
                }
                _ => ctrl::ERR,
            };
            if chain.writable.is_empty() {
                return Err(DeviceError::BadRequest(
                    "control command with no room for the answer",
                ));
            }
            scatter(mem, &chain.writable, &[answer])?;
            add_used_batch(queue, mem, &[(chain.head, 1)])?;
            outcome.used = true;
        }
        Ok(outcome)
    }

    /// The next frame's length in the pair's `rx_buf`: the held one, or a fresh one
    /// from the host.
    fn next_frame(&mut self, pair: usize) -> Option<usize> {
        let p = self.pairs.get_mut(pair)?;
        if let Some(n) = p.pending.take() {
            return Some(n);
        }
        loop {
            match p.backend.recv(&mut p.rx_buf) {
                Ok(Some(n)) if (VNET_HDR_LEN..=MAX_FRAME).contains(&n) => return Some(n),
                Ok(Some(n)) => {
                    tracing::debug!(len = n, "virtio-net rx: runt frame from the host dropped");
                    self.rx_dropped += 1;
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("reading TAP {}: {e}", p.backend.name());
                    return None;
                }
            }
        }
    }

    fn receive(
        &mut self,
        pair: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        let mergeable = self.acked & features::MRG_RXBUF != 0;
        let mut chains: Vec<(Chain, usize)> = Vec::new();
        let limiter = self.limiters.rx.clone();
        let mut limiter = lock_limiter(&limiter);
        let limited = limiter.is_limited();
        while let Some(len) = self.next_frame(pair) {
            let Some(p) = self.pairs.get_mut(pair) else {
                break;
            };
            if limited {
                if let Err(wait) = limiter.consume(1, (len - VNET_HDR_LEN) as u64) {
                    // Held until the limiter has the tokens; the TAP is not read meanwhile.
                    p.pending = Some(len);
                    outcome.throttled = Some(wait);
                    break;
                }
            }
            let Some(h) = p.rx_buf.get_mut(..VNET_HDR_LEN) else {
                break;
            };
            if !rx_header_fixup(h, self.acked) {
                tracing::debug!(
                    len,
                    "virtio-net rx: frame with offloads not negotiated dropped"
                );
                self.rx_dropped += 1;
                continue;
            }
            // Buffers for the frame: one chain, or as many as it takes when mergeable.
            chains.clear();
            let mut room = 0usize;
            while room < len && (mergeable || chains.is_empty()) {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let chain = Chain::collect(chain, size, mem)?;
                let r: usize = chain.writable.iter().map(|d| d.len() as usize).sum();
                if r < VNET_HDR_LEN && chains.is_empty() {
                    return Err(DeviceError::BadRequest(
                        "receive buffer smaller than the virtio-net header",
                    ));
                }
                if r == 0 {
                    return Err(DeviceError::BadRequest("receive buffer with no room"));
                }
                room += r;
                chains.push((chain, r));
            }
            if chains.is_empty() || (mergeable && room < len) {
                // Give the chains back untouched and hold the frame for the next notify,
                // unless the whole queue would not hold it.
                let taken = chains.len() as u16;
                queue.set_next_avail(queue.next_avail().wrapping_sub(taken));
                if taken >= size {
                    tracing::debug!(len, "virtio-net rx: frame larger than the ring dropped");
                    self.rx_dropped += 1;
                } else {
                    tracing::trace!(len, "virtio-net rx: no guest buffer, frame held");
                    p.pending = Some(len);
                    outcome.starved = true;
                }
                break;
            }
            if room < len {
                // Without mergeable buffers a frame must fit one chain.
                self.rx_dropped += 1;
                if let Some((chain, _)) = chains.first() {
                    add_used_batch(queue, mem, &[(chain.head, 0)])?;
                }
                outcome.used = true;
                continue;
            }
            let count = chains.len() as u16;
            p.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
            let mut used = Vec::with_capacity(chains.len());
            let mut at = 0usize;
            for (chain, r) in &chains {
                let n = (*r).min(len - at);
                scatter(mem, &chain.writable, &p.rx_buf[at..at + n])?;
                used.push((chain.head, n as u32));
                at += n;
            }
            add_used_batch(queue, mem, &used)?;
            tracing::trace!(len, buffers = count, "virtio-net rx");
            self.rx_frames += 1;
            let c = &self.limiters.counters;
            c.rx_packets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.rx_bytes.fetch_add(
                (len - VNET_HDR_LEN) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            outcome.used = true;
            if len >= BULK_FRAME {
                p.streaming_until = Some(std::time::Instant::now() + TX_STREAMING);
            }
        }
        // The TAP drives this queue: the driver's refills need no notify until a frame
        // finds too few buffers.
        outcome.host_driven = !outcome.starved;
        Ok(outcome)
    }

    fn transmit(
        &mut self,
        pair: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        let limiter = self.limiters.tx.clone();
        let mut limiter = lock_limiter(&limiter);
        let limited = limiter.is_limited();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            if limited {
                let bytes: u64 = chain.readable.iter().map(|d| u64::from(d.len())).sum();
                let bytes = bytes.saturating_sub(VNET_HDR_LEN as u64);
                if let Err(wait) = limiter.consume(1, bytes) {
                    // Back on the ring until the limiter has the tokens.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    outcome.throttled = Some(wait);
                    break;
                }
            }
            let frame = gather(mem, &chain.readable, MAX_FRAME as u64)?;
            if frame.len() < VNET_HDR_LEN {
                return Err(DeviceError::BadRequest(
                    "transmit buffer shorter than the header",
                ));
            }
            if !tx_header_ok(&frame, self.acked) {
                tracing::debug!(
                    flags = frame[0],
                    gso_type = frame[1],
                    "virtio-net tx: header asks for offloads not negotiated; frame dropped"
                );
                self.tx_dropped += 1;
            } else {
                tracing::trace!(len = frame.len(), "virtio-net tx");
                outcome.bulk |= frame.len() >= BULK_FRAME;
                // A pair whose TAP queue is detached (the driver's pair count is not
                // known yet, as after a restore) sends through the first: a detached
                // queue refuses writes.
                let out = if self
                    .pairs
                    .get(pair)
                    .is_some_and(|p| p.enabled.load(Ordering::Acquire))
                {
                    pair
                } else {
                    0
                };
                let Some(p) = self.pairs.get_mut(out) else {
                    break;
                };
                match p.backend.send(&frame) {
                    Ok(()) => {
                        self.tx_frames += 1;
                        let c = &self.limiters.counters;
                        c.tx_packets
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        c.tx_bytes.fetch_add(
                            (frame.len() - VNET_HDR_LEN) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    Err(e) => {
                        self.tx_dropped += 1;
                        tracing::debug!("TAP {} send: {e}", p.backend.name())
                    }
                }
            }
            queue
                .add_used(mem, chain.head, 0)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            outcome.used = true;
        }
        if outcome.bulk {
            if let Some(p) = self.pairs.get_mut(pair) {
                p.streaming_until = Some(std::time::Instant::now() + TX_STREAMING);
            }
        }
        Ok(outcome)
    }

    fn apply_offloads(&mut self) {
        let flags = tap_offloads(self.acked);
        for p in &mut self.pairs {
            if let Err(e) = p.backend.set_offload(flags) {
                // The kernel then keeps handing us whole frames: slower, still correct.
                tracing::warn!("virtio-net: {e}");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mq = if self.pairs.len() > 1 {
            features::MQ | features::CTRL_VQ
        } else {
            0
        };
        OFFERED | mq | if self.mtu.is_some() { features::MTU } else { 0 }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
        tracing::debug!(
            acked = format_args!("{:#x}", self.acked),
            "virtio-net features"
        );
        self.apply_offloads();
        // Until the driver asks for more (and a driver without MQ never does): one pair.
        self.use_pairs(1);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (spec 5.1.4); the
        // fields past the MAC only when the MTU or several queue pairs are advertised.
        if self.mtu.is_none() && self.pairs.len() < 2 {
            return read_config_bytes(&self.mac, offset, data);
        }
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        let pairs = u16::try_from(self.pairs.len().max(1)).unwrap_or(MAX_QUEUE_PAIRS);
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        if Some(index) == self.ctrl_queue() {
            return self.control(queue, mem);
        }
        let pair = index / 2;
        if pair >= self.pairs.len() {
            return Ok(QueueOutcome::default());
        }
        if index % 2 == RX_QUEUE {
            self.receive(pair, queue, mem)
        } else {
            self.transmit(pair, queue, mem)
        }
    }

    /// Transmitting never waits on the host (the TAP does not block): a frame the guest
    /// queues leaves from the notifying vCPU, without waking the I/O thread. A response
    /// so reaches the host before the guest's next instruction.
    ///
    /// Its completion interrupts as soon as used_event asks, though Linux would also
    /// free the buffer in its next receive poll. Holding it for that (up to 1 ms, tried
    /// in bench/net.sh) cut the guest's interrupts per 64-byte round trip from 1.9 to
    /// 1.1 but made the round trip slower (median 136 against 87 µs): the freeing then
    /// runs ahead of the next response instead of while the host turns around.
    fn serves_inline(&self, index: usize) -> bool {
        index % 2 == TX_QUEUE && index / 2 < self.pairs.len()
    }

    /// While the guest streams, its notifies go to the I/O thread, which coalesces them
    /// so the guest's TCP gathers small writes into large segments (and the copying
    /// overlaps the guest's work).
    fn inline_now(&self, index: usize) -> bool {
        index % 2 == TX_QUEUE
            && self.pairs.get(index / 2).is_some_and(|p| {
                p.streaming_until
                    .is_none_or(|t| std::time::Instant::now() >= t)
            })
    }

    fn host_handles(&self) -> std::io::Result<Option<crate::HostHandle>> {
        let Some(first) = self.pairs.first() else {
            return Ok(None);
        };
        let queues = self
            .pairs
            .iter()
            .map(|p| p.backend.poll_fd())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Some(crate::HostHandle::Tap {
            name: first.backend.name().to_string(),
            queues,
        }))
    }

    fn queue_pairs_in_use(&self) -> Option<u16> {
        if self.pairs.len() < 2 || self.acked & features::MQ == 0 {
            return None;
        }
        let n = self
            .pairs
            .iter()
            .filter(|p| p.enabled.load(Ordering::Acquire))
            .count();
        u16::try_from(n).ok()
    }

    fn held_frames(&self) -> Vec<crate::HeldFrame> {
        self.pairs
            .iter()
            .enumerate()
            .filter_map(|(k, p)| {
                Some(crate::HeldFrame {
                    pair: u16::try_from(k).ok()?,
                    bytes: p.rx_buf.get(..p.pending?)?.to_vec(),
                })
            })
            .collect()
    }

    fn hold_frames(&mut self, frames: &[crate::HeldFrame]) -> Result<(), String> {
        let mut taken = vec![false; self.pairs.len()];
        for f in frames {
            let k = usize::from(f.pair);
            match taken.get_mut(k) {
                None => {
                    return Err(format!(
                        "a frame for queue pair {k} of a device with {}",
                        self.pairs.len()
                    ))
                }
                Some(true) => return Err(format!("two frames for queue pair {k}")),
                Some(t) => *t = true,
            }
            if !(VNET_HDR_LEN..=MAX_FRAME).contains(&f.bytes.len()) {
                return Err(format!("a frame of {} bytes", f.bytes.len()));
            }
        }
        // Checked above: a pair of this device, a length its buffer holds. Its header is
        // checked against the acked features when it is delivered, as a TAP's frame is.
        for f in frames {
            if let Some(p) = self.pairs.get_mut(usize::from(f.pair)) {
                if let Some(buf) = p.rx_buf.get_mut(..f.bytes.len()) {
                    buf.copy_from_slice(&f.bytes);
                    p.pending = Some(f.bytes.len());
                }
            }
        }
        Ok(())
    }

    fn restored(&mut self) -> Vec<usize> {
        // A held frame goes to the driver as soon as it has a buffer: now, if it had one
        // posted when the VM stopped (no notify would come for it).
        (0..self.pairs.len())
            .filter(|&k| self.pairs.get(k).is_some_and(|p| p.pending.is_some()))
            .map(|k| 2 * k)
            .collect()
    }

    fn use_queue_pairs(&mut self, pairs: u16) {
        let n = usize::from(pairs);
        if (1..=self.pairs.len()).contains(&n) && self.acked & features::MQ != 0 {
            self.use_pairs(n);
        } else {
            tracing::warn!(pairs, "virtio-net: a restore's queue pair count ignored");
        }
    }

    fn reset(&mut self) {
        for p in &mut self.pairs {
            p.pending = None;
            p.streaming_until = None;
        }
        self.use_pairs(1);
        if self.acked != 0 {
            self.acked = 0;
            self.apply_offloads();
        }
    }
}

/// What an I/O thread polls for a queue pair's host input ([`Net::host_input`]): its
/// TAP queue while the driver uses the pair. A detached TAP queue polls as an error;
/// that is not a failure while the pair is off.
#[derive(Debug)]
pub struct PairInput {
    fd: Option<OwnedFd>,
    queue: usize,
    enabled: Arc<AtomicBool>,
}

impl crate::transport::HostInput for PairInput {
    fn fds(&mut self, out: &mut Vec<RawFd>) {
        if self.enabled.load(Ordering::Acquire) {
            out.extend(self.fd.as_ref().map(|fd| fd.as_raw_fd()));
        }
    }

    fn ready(&mut self, revents: &[i16]) -> Option<usize> {
        let r = revents.first().copied().unwrap_or(0);
        if r & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            if self.enabled.load(Ordering::Acquire) {
                tracing::warn!("TAP queue failed; no more host input on it");
                self.fd = None;
            }
            return None;
        }
        (r & libc::POLLIN != 0).then_some(self.queue)
    }
}

/// A locally administered, unicast MAC derived from `seed` (e.g. the TAP name).
pub fn default_mac(seed: &str) -> [u8; 6] {
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}
