//! virtio-net on a host TAP device. No offloads are offered: frames cross whole, each with
//! the 12-byte virtio-net header that the TAP understands natively.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::queue::{gather, scatter, Chain};
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::{device_type, read_config_bytes, DeviceError, QueueOutcome, VirtioDevice};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Largest frame with header: 64 KiB (the TAP never sends more without GSO).
const MAX_FRAME: usize = 65_562;

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    /// A frame read from the TAP that found no guest buffer yet.
    pending: Option<Vec<u8>>,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            pending: None,
            rx_frames: 0,
            tx_frames: 0,
            rx_dropped: 0,
        }
    }

    /// A duplicate of the TAP's descriptor, for the VMM's readiness polling.
    pub fn poll_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.tap.try_clone_fd()
    }

    /// True when a received frame waits for guest buffers.
    pub fn rx_blocked(&self) -> bool {
        self.pending.is_some()
    }

    fn next_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(f) = self.pending.take() {
            return Some(f);
        }
        let mut buf = vec![0u8; MAX_FRAME];
        match self.tap.recv(&mut buf) {
            Ok(Some(n)) if n >= VNET_HDR_LEN => {
                buf.truncate(n);
                Some(buf)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("reading TAP {}: {e}", self.tap.name());
                None
            }
        }
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        while let Some(frame) = self.next_frame() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                tracing::debug!(
                    len = frame.len(),
                    "virtio-net rx: no guest buffer, frame held"
                );
                self.pending = Some(frame);
                break;
            };
            tracing::debug!(len = frame.len(), "virtio-net rx");
            let chain = Chain::collect(chain, size, mem)?;
            let room: usize = chain.writable.iter().map(|d| d.len() as usize).sum();
            let len = if frame.len() <= room {
                // num_buffers = 1: the frame fits one chain (no mergeable buffers).
                let mut frame = frame;
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                scatter(mem, &chain.writable, &frame)?;
                self.rx_frames += 1;
                frame.len() as u32
            } else {
                self.rx_dropped += 1;
                0
            };
            queue
                .add_used(mem, chain.head, len)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            outcome.used = true;
        }
        Ok(outcome)
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let frame = gather(mem, &chain.readable, MAX_FRAME as u64)?;
            if frame.len() < VNET_HDR_LEN {
                return Err(DeviceError::BadRequest(
                    "transmit buffer shorter than the header",
                ));
            }
            tracing::debug!(len = frame.len(), "virtio-net tx");
            match self.tap.send(&frame) {
                Ok(()) => self.tx_frames += 1,
                Err(e) => tracing::debug!("TAP {} send: {e}", self.tap.name()),
            }
            queue
                .add_used(mem, chain.head, 0)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            outcome.used = true;
        }
        Ok(outcome)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(QueueOutcome::default()),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
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
