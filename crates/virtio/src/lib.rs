//! Paravirtual I/O: the virtio-mmio transport (virtio 1.x, modern only) and the devices
//! behind it.
//!
//! A device implements [`VirtioDevice`]: its type, features, config space and what to do
//! when the driver kicks a queue. [`mmio::MmioTransport`] owns the register interface,
//! the queues and the interrupt, and maps onto the VMM's MMIO bus. Guest memory reaches
//! devices only through vm-memory's bounds-checked accessors and virtio-queue's chains.

pub mod balloon;
pub mod blk;
pub mod console;
#[doc(hidden)]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;
pub mod ram_watch;
pub mod rate_limiter;
pub mod rng;
pub mod tap;
pub mod transport;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Device IDs from the virtio spec (5 Device Types).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// VIRTIO_F_VERSION_1: the modern interface; the only one Vessel offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// VIRTIO_RING_F_EVENT_IDX: the driver publishes used_event (interrupt me when the used
/// index passes it) and the device avail_event (kick me when the avail index passes it).
/// The transport arms it on every queue once negotiated and, after each round of a queue,
/// publishes avail_event (the next request, or for a queue that reported
/// [`QueueOutcome::starved`] the next buffer past those it saw) and decides the interrupt
/// from used_event over everything the round used.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// What a device asks of the transport after handling a queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Used buffers were added: interrupt the driver (subject to notification suppression).
    pub used: bool,
    /// Handling this queue produced work for another one (vsock replies on its receive
    /// queue): the transport processes that queue next.
    pub also_process: Option<usize>,
    /// Host-side input is waiting for buffers the driver has not posted yet (a frame
    /// from the TAP): whoever feeds this queue can stop polling its source until the
    /// driver's next notify.
    pub starved: bool,
    /// The queue is served when host input arrives, not when the driver adds buffers
    /// (a receive queue with buffers to spare): the transport asks the driver not to
    /// notify for it until it reports `starved`, so refilling costs the guest no exit.
    pub host_driven: bool,
    /// The round moved bulk data (a transmitted frame of [`net::BULK_FRAME`] bytes or
    /// more): a moderated queue (`transport::IoThread::coalesce`) holds back the
    /// driver's next notifies only after such a round, so small exchanges never wait.
    pub bulk: bool,
    /// The device's rate limiter stopped it with requests (or a held frame) left: its I/O
    /// thread runs the queue again after this long, notify or not.
    pub throttled: Option<std::time::Duration>,
}

/// A device that faulted on guest input puts itself in NEEDS_RESET; this says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("descriptor chain: {0}")]
    Chain(#[from] queue::ChainError),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("guest memory access at {0:#x} failed")]
    GuestMemory(u64),
}

/// How a device took up a notified queue.
pub enum Started {
    /// Served in full under the device lock.
    Done(QueueOutcome),
    /// Chains popped off the ring, to be run by the transport with the device lock
    /// released (disk I/O must not hold up the guest's register accesses), then
    /// published on the ring in one batch.
    Unlocked(Box<dyn QueueWork>),
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Started::Done(o) => f.debug_tuple("Done").field(o).finish(),
            Started::Unlocked(_) => f.write_str("Unlocked(..)"),
        }
    }
}

/// Requests a device took off a queue, run without the device lock.
pub trait QueueWork: Send {
    /// Serve the requests; guest buffers are written, the used ring is not.
    fn run(self: Box<Self>, mem: &GuestMemoryMmap) -> WorkDone;
    /// Serve, in order, the requests that need no waiting on the host (a read whose data
    /// is in the page cache), up to the first that would; those are left for
    /// [`QueueWork::run`]. Returns what was completed; by default nothing.
    fn run_nowait(&mut self, _mem: &GuestMemoryMmap) -> WorkDone {
        WorkDone::default()
    }
    /// Whether requests are left to run.
    fn is_empty(&self) -> bool {
        false
    }
}

/// What [`QueueWork::run`] completed.
#[derive(Debug, Default)]
pub struct WorkDone {
    /// (head, bytes written) for the used ring, in completion order.
    pub used: Vec<(u16, u32)>,
    /// A request the device could not complete at all (its status byte is outside
    /// guest memory): the device needs a reset after publishing `used`.
    pub error: Option<DeviceError>,
    /// Requests were left on the ring by the device's rate limiter
    /// ([`QueueOutcome::throttled`]).
    pub throttled: Option<std::time::Duration>,
    /// Served on the notifying vCPU for a guest task that sleeps meanwhile (a write,
    /// which Linux issues from the writer's `schedule` through a kernel worker): the
    /// interrupt waits for a vCPU to halt ([`transport::Interrupt::raise_at_halt`]).
    pub at_halt: bool,
}

/// A virtio device model, transport-independent.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Queue sizes the device supports (their count is the number of queues).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// The features the driver accepted, once FEATURES_OK is set.
    fn ack_features(&mut self, _features: u64) {}
    /// Read the device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device config space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver made buffers available on queue `index`.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError>;
    /// Take up a notified queue. By default the whole of [`VirtioDevice::process_queue`]
    /// under the device lock; devices that do slow host I/O return the work instead.
    fn start_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Started, DeviceError> {
        self.process_queue(index, queue, mem).map(Started::Done)
    }
    /// The driver reset the device: drop in-flight state.
    fn reset(&mut self) {}
    /// Queues to run once the driver sets DRIVER_OK, for buffers it posted (and notified,
    /// which the transport ignores) before: Linux's balloon driver primes its stats
    /// queue so during probe.
    fn queues_at_driver_ok(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Whether queue `index`'s interrupts may be moderated: held while the guest keeps
    /// several requests in flight, so their completions share one (see
    /// `transport::Moderation`). For request/response queues (a disk's), not for a
    /// NIC's, whose frames come when the host sends them.
    fn moderate_interrupts(&self, _index: usize) -> bool {
        false
    }
    /// Whether the work [`VirtioDevice::start_queue`] returns can serve what needs no
    /// waiting on the host ([`QueueWork::run_nowait`]), so a notify may be served on the
    /// notifying vCPU (`transport::Doorbell::serve_inline`).
    fn serves_nowait(&self) -> bool {
        false
    }
    /// Whether notifies of queue `index` may be served on the notifying vCPU
    /// (`transport::Doorbell::serve_inline`); the VMM then registers no ioevent for that
    /// queue. By default every queue of a device that [`VirtioDevice::serves_nowait`].
    /// A queue whose round never waits on the host qualifies too (a NIC's transmit queue:
    /// a frame written to a non-blocking TAP).
    fn serves_inline(&self, _index: usize) -> bool {
        self.serves_nowait()
    }
    /// Whether this notify of an inline queue is served on the vCPU now; false leaves it
    /// to the I/O thread (a NIC's transmit queue in a bulk stream, which the thread
    /// coalesces).
    fn inline_now(&self, _index: usize) -> bool {
        true
    }
    /// How many queue pairs the driver said it uses (virtio-net's VQ_PAIRS_SET), for a
    /// snapshot; None for a device that has no such choice.
    fn queue_pairs_in_use(&self) -> Option<u16> {
        None
    }
    /// A restore's [`VirtioDevice::queue_pairs_in_use`], after its features were acked;
    /// a count the device cannot use is ignored.
    fn use_queue_pairs(&mut self, _pairs: u16) {}
    /// Duplicates of the host descriptors the device works through that a migration's
    /// destination on the same host takes over as they are (a TAP's queues, vsock's
    /// listening socket): passed with SCM_RIGHTS, they keep frames and connections that
    /// arrive during the move, where opening them again by name would have to wait for
    /// this VMM to let go. None for a device without such descriptors.
    fn host_handles(&self) -> std::io::Result<Option<HostHandle>> {
        Ok(None)
    }
    /// The VM was restored (from a snapshot or a migration) with the driver running:
    /// the queues to run once before the guest does, for what the device must tell the
    /// driver about the move (vsock's transport reset) or give it (a NIC's held frame).
    fn restored(&mut self) -> Vec<usize> {
        Vec::new()
    }
    /// Frames the device took from the host and holds for the driver (a NIC's received
    /// frame that found no free receive buffer, or that its rate limiter held back),
    /// which the host cannot send again: a snapshot keeps them. Empty for devices that
    /// hold none.
    fn held_frames(&self) -> Vec<HeldFrame> {
        Vec::new()
    }
    /// A restore's [`VirtioDevice::held_frames`], before the VM runs. Refused, with the
    /// reason and nothing changed, when the device cannot hold them (a queue pair it
    /// lacks, two frames for one pair, a length no frame has).
    fn hold_frames(&mut self, frames: &[HeldFrame]) -> Result<(), String> {
        match frames.is_empty() {
            true => Ok(()),
            false => Err("this device holds no frames".into()),
        }
    }
    /// What a snapshot keeps of the device beyond its queues and features (a balloon's
    /// sizes and the statistics buffer it holds); None for devices that keep nothing more.
    fn device_state(&self) -> Option<DeviceState> {
        None
    }
    /// A restore's [`VirtioDevice::device_state`], before the VM runs. Refused, with the
    /// reason and nothing changed, when the state is not this device's or does not fit it.
    fn restore_device_state(&mut self, _state: &DeviceState) -> Result<(), String> {
        Err("this device keeps no state of its own".into())
    }
}

pub use transport::{DeviceState, HeldFrame};

/// Host descriptors a device hands to a migration's destination ([`VirtioDevice::host_handles`]).
#[derive(Debug)]
pub enum HostHandle {
    /// The TAP device `name`'s queues, in queue-pair order.
    Tap {
        name: String,
        queues: Vec<std::os::fd::OwnedFd>,
    },
    /// vsock's listening socket bound at `path`.
    VsockListener {
        path: std::path::PathBuf,
        fd: std::os::fd::OwnedFd,
    },
}

/// Copy `data` into a config-space read at `offset` (bytes past the end read as zero).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(off..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests;
