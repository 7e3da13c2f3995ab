//! What the virtio transports share: the device and its queues under one lock
//! ([`DeviceCore`]), the feature and status handshake, interrupts through an
//! [`Interrupt`] the transport provides, and the I/O threads that run devices off the
//! vCPUs ([`Doorbell`], [`IoThread`], [`IoGate`]).
//!
//! A transport (`mmio`, `pci`) is only its register layout: it turns the driver's
//! register accesses into calls here, and chooses how an interrupt reaches the guest
//! (an edge on a GSI for virtio-mmio; an MSI-X vector, or the INTx line, for
//! virtio-pci).
//!
//! Without an I/O thread a queue notify runs the device on the notifying vCPU. With one
//! ([`Doorbell::io_thread`]) each queue has an eventfd doorbell: the transport's notify
//! register writes it, or the accelerator does directly when the VMM registered it as
//! an ioevent ([`IoThread::queue_notifiers`]), and the thread wakes, processes the queue
//! and raises the interrupt (both the KVM irq ioctls and the emu's user-space chip may
//! be driven from any thread; virtio-mmio's edge can also be an irqfd,
//! [`GsiEdge::use_irqfd`]). The thread also waits for the device's [`HostInput`] and
//! the VM's exit signal, never on a timeout. A driver reset takes the device lock, so
//! it waits for work in progress and the thread then finds the device stopped.
//!
//! Notification suppression lives here too, for both transports: after each round of a
//! queue the core publishes avail_event (or the NO_NOTIFY flag) and decides the
//! interrupt from used_event over everything the round used
//! ([`crate::VIRTIO_RING_F_EVENT_IDX`]).
//!
//! On a chip that can hold an interrupt until a vCPU halts (the emu's,
//! [`hypervisor::IrqChip::moderates`]), a device's request queues are moderated
//! (`Moderation`): a guest keeping several requests in flight gets one interrupt for as
//! many completions as it took up per interrupt before, a guest waiting for one request
//! gets it at once.

mod persist;
pub use persist::{CoreSnapshot, DeviceState, HeldFrame, QueueSnapshot, RestoreError};

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use devices::ExitSignal;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    QueueOutcome, Started, VirtioDevice, WorkDone, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Why the device interrupts the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Used buffers on this queue.
    Queue(usize),
    /// The configuration changed, or the device needs a reset.
    Config,
}

/// How a transport's interrupts reach the guest. Called from vCPU and I/O threads,
/// sometimes with the device lock held: implementations must not call back into the
/// device.
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// Tell the driver; the interrupt status bit for `cause` is already set.
    fn raise(&self, cause: Cause);
    /// The driver reset the device: drop any interrupt state (an asserted line).
    fn reset(&self) {}
    /// Whether queue interrupts may be held back while the guest is busy
    /// ([`QUEUE_INTERRUPT_HOLD`]).
    fn moderated(&self) -> bool {
        false
    }
    /// [`Interrupt::raise`], held back until a vCPU halts, [`Interrupt::release_held`],
    /// or [`QUEUE_INTERRUPT_HOLD`] passes (a plain raise where not [`Interrupt::moderated`]).
    fn raise_held(&self, cause: Cause) {
        self.raise(cause)
    }
    /// Sends the queue interrupts held back, now.
    fn release_held(&self) {}
    /// [`Interrupt::raise`] for completions a vCPU served within a notify while the guest
    /// task waiting for them sleeps ([`crate::WorkDone::at_halt`]): on a chip that
    /// moderates, with several vCPUs, it goes out when a vCPU halts (at most
    /// [`QUEUE_INTERRUPT_HOLD`] later), not while the notifying one still runs
    /// ([`hypervisor::IrqChip::pulse_irq_line_at_halt`]). Else [`Interrupt::raise_held`].
    fn raise_at_halt(&self, cause: Cause) {
        self.raise_held(cause)
    }
}

impl<T: Interrupt> Interrupt for Arc<T> {
    fn raise(&self, cause: Cause) {
        (**self).raise(cause)
    }
    fn moderated(&self) -> bool {
        (**self).moderated()
    }
    fn raise_held(&self, cause: Cause) {
        (**self).raise_held(cause)
    }
    fn release_held(&self) {
        (**self).release_held()
    }
    fn raise_at_halt(&self, cause: Cause) {
        (**self).raise_at_halt(cause)
    }
    fn reset(&self) {
        (**self).reset()
    }
}

/// How long at most a queue's interrupt may wait while every vCPU is busy, on a chip
/// that can hold it until one halts ([`hypervisor::IrqChip::moderates`], the emu's):
/// requests the guest submits meanwhile complete under the same interrupt (queue depth
/// above one costs the guest fewer interrupts than requests), and a guest that waits
/// for a completion is halted, so it gets it at once. Configuration interrupts are
/// never held.
pub const QUEUE_INTERRUPT_HOLD: Duration = Duration::from_micros(500);

/// virtio-mmio's interrupt: an edge on the device's GSI, through the chip or, once the
/// VMM gave one ([`GsiEdge::use_irqfd`]), through an irqfd. On a chip that moderates
/// (the emu's, in this process) every interrupt goes straight to the chip, and queue
/// interrupts may be held edges ([`QUEUE_INTERRUPT_HOLD`]).
pub struct GsiEdge {
    irq: Arc<dyn hypervisor::IrqChip>,
    gsi: u32,
    /// `irq.moderates()`, asked once.
    moderated: bool,
    /// When set, an interrupt is a write to this eventfd (an irqfd the accelerator turns
    /// into an edge on `gsi`) instead of a call into `irq`.
    irqfd: OnceLock<hypervisor::EventFd>,
}

impl GsiEdge {
    pub fn new(irq: Arc<dyn hypervisor::IrqChip>, gsi: u32) -> Self {
        GsiEdge {
            moderated: irq.moderates(),
            irq,
            gsi,
            irqfd: OnceLock::new(),
        }
    }

    /// The GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// From now on interrupts are writes to `fd`, an eventfd the VMM registered with the
    /// accelerator as an irqfd for this GSI. False if one was set already.
    pub fn use_irqfd(&self, fd: hypervisor::EventFd) -> bool {
        self.irqfd.set(fd).is_ok()
    }
}

impl std::fmt::Debug for GsiEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiEdge")
            .field("gsi", &self.gsi)
            .field("irqfd", &self.irqfd.get().is_some())
            .finish()
    }
}

impl Interrupt for GsiEdge {
    fn moderated(&self) -> bool {
        self.moderated
    }

    fn release_held(&self) {
        self.irq.release_moderated();
    }

    fn raise_held(&self, cause: Cause) {
        if !self.moderated {
            return self.raise(cause);
        }
        if let Err(e) = self
            .irq
            .pulse_irq_line_moderated(self.gsi, QUEUE_INTERRUPT_HOLD)
        {
            tracing::warn!(gsi = self.gsi, "virtio interrupt failed: {e}");
        }
    }

    fn raise_at_halt(&self, cause: Cause) {
        if !self.moderated {
            return self.raise(cause);
        }
        if let Err(e) = self
            .irq
            .pulse_irq_line_at_halt(self.gsi, QUEUE_INTERRUPT_HOLD)
        {
            tracing::warn!(gsi = self.gsi, "virtio interrupt failed: {e}");
        }
    }

    fn raise(&self, _cause: Cause) {
        if self.moderated {
            // On the emu's chip: straight in, which also wakes a halted vCPU without the
            // irqfd thread's hop (a 64-byte TCP round trip: ~300 -> ~230 us), and lets a
            // vCPU serving a notify itself take the interrupt before its next instruction.
            if let Err(e) = self.irq.pulse_irq_line(self.gsi) {
                tracing::warn!(gsi = self.gsi, "virtio interrupt failed: {e}");
            }
        } else if let Some(fd) = self.irqfd.get() {
            if let Err(e) = fd.write(1) {
                tracing::warn!(gsi = self.gsi, "virtio interrupt through its irqfd: {e}");
            }
        } else if let Err(e) = self.irq.pulse_irq_line(self.gsi) {
            tracing::warn!(gsi = self.gsi, "virtio interrupt failed: {e}");
        }
    }
}

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Interrupts between probes ([`Moderation`]).
pub(crate) const PROBE_EVERY: u16 = 32;
/// The most completions a moderated queue waits for before it interrupts.
const MAX_DEPTH: u16 = 32;

/// Interrupt moderation for one queue (a device's
/// [`crate::VirtioDevice::moderate_interrupts`]), with EVENT_IDX, on a chip that can
/// hold an interrupt until a vCPU halts.
///
/// A guest that submits one request at a time waits for each completion, and should
/// get it at once: held until its vCPU halts, it would pay for going idle and back.
/// A guest with several requests in flight is busy submitting the others when the
/// first completes, and one interrupt for all of them saves it the rest. The queue
/// learns which from the driver itself: how far used_event moved between two
/// interrupts is how many completions the driver took up per interrupt. An interrupt
/// is held until that many completions are pending (then sent, before the guest goes
/// idle) or a vCPU halts; every [`PROBE_EVERY`] interrupts one is held until a halt,
/// which shows how many requests the guest really keeps in flight.
#[derive(Debug)]
struct Moderation {
    enabled: bool,
    /// used_event at the last interrupt decision.
    last_event: Option<u16>,
    /// Completions the driver took up per interrupt, lately.
    depth: u16,
    /// An interrupt is held and waits for `depth` completions.
    holding: bool,
    /// Interrupts until the next probe.
    probe_in: u16,
}

/// What [`Moderation::decide`] says to do about a queue's new used entries.
#[derive(Debug, PartialEq, Eq)]
enum Moderated {
    Nothing,
    Now,
    Hold,
    Release,
}

impl Moderation {
    fn new(enabled: bool) -> Self {
        Moderation {
            enabled,
            last_event: None,
            depth: 1,
            holding: false,
            probe_in: PROBE_EVERY,
        }
    }

    fn reset(&mut self) {
        *self = Moderation::new(self.enabled);
    }

    /// `needs`: the driver asked for an interrupt (used_event crossed); `pending`:
    /// completions past `used_event`.
    fn decide(&mut self, needs: bool, used_event: u16, pending: u16) -> Moderated {
        if !needs {
            // More completions under an interrupt already held (or sent).
            if self.holding && pending >= self.depth {
                self.holding = false;
                return Moderated::Release;
            }
            return Moderated::Nothing;
        }
        // The driver asked again, so it took up what the last interrupt announced.
        if let Some(last) = self.last_event {
            self.depth = used_event.wrapping_sub(last).clamp(1, MAX_DEPTH);
        }
        self.last_event = Some(used_event);
        self.probe_in = self.probe_in.saturating_sub(1);
        let probe = self.probe_in == 0;
        if probe {
            self.probe_in = PROBE_EVERY;
        }
        if pending >= self.depth && !probe {
            self.holding = false;
            return Moderated::Now;
        }
        // A probe waits for the halt, not for `depth`.
        self.holding = !probe;
        Moderated::Hold
    }
}

/// What the device lock guards.
struct CoreState {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    /// Per queue, the used index at the last interrupt decision (see
    /// [`crate::queue::needs_interrupt`]).
    signalled: Vec<u16>,
    /// Per queue, how its interrupts are moderated (devices that ask for it, on a chip
    /// that can hold interrupts).
    moderation: Vec<Moderation>,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

/// A device, its queues and its interrupt, shared between the transport's registers and
/// whichever thread runs the device.
pub struct DeviceCore {
    state: Mutex<CoreState>,
    /// One per queue: held by whoever runs that queue's work outside `state` (disk
    /// I/O), so queues served by different threads (vCPUs serving inline, I/O threads)
    /// run their requests at the same time. A driver reset and a snapshot take them all
    /// (in queue order), and so wait for all work in progress. Always taken before
    /// `state`.
    in_flight: Vec<Mutex<()>>,
    /// Per queue, requests [`DeviceCore::process_inline`] took off it but could not
    /// serve without waiting, for the I/O thread to finish (taken under the queue's
    /// `in_flight`).
    deferred: Vec<Mutex<Option<Box<dyn crate::QueueWork>>>>,
    interrupt_status: AtomicU32,
    mem: GuestMemoryMmap,
    interrupt: Box<dyn Interrupt>,
    device_type: u32,
    /// What the transport offers: the device's features and VERSION_1.
    offered: u64,
}

/// How one round of a queue ended.
enum Round {
    /// Served under the lock; `more`: run another round at once (the driver added
    /// requests, or buffers a starved queue waited for, while this one ran).
    Done(QueueOutcome, bool),
    Unlocked(Box<dyn crate::QueueWork>),
}

impl std::fmt::Debug for DeviceCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCore")
            .field("device_type", &self.device_type)
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

impl DeviceCore {
    /// A device with its queues at their maximum sizes, interrupting through
    /// `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Box<dyn Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // A max size that is zero or not a power of two is a device bug: clamp to 256.
            .map(|&s| Queue::new(s).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect();
        let offered = device.features() | VIRTIO_F_VERSION_1;
        let device_type = device.device_type();
        let count = device.queue_max_sizes().len();
        let signalled = vec![0; count];
        let moderation = (0..signalled.len())
            .map(|i| Moderation::new(device.moderate_interrupts(i)))
            .collect();
        DeviceCore {
            state: Mutex::new(CoreState {
                device,
                queues,
                signalled,
                moderation,
                driver_features: 0,
                status: 0,
                config_generation: 0,
            }),
            in_flight: (0..count).map(|_| Mutex::new(())).collect(),
            deferred: (0..count).map(|_| Mutex::new(None)).collect(),
            interrupt_status: AtomicU32::new(0),
            mem,
            interrupt,
            device_type,
            offered,
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// How many queues the device has.
    pub fn num_queues(&self) -> usize {
        self.lock().queues.len()
    }

    /// The 32 feature bits at `select` (0: bits 0-31, 1: bits 32-63) the device offers.
    pub fn offered_features(&self, select: u32) -> u32 {
        match select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 feature bits at `select` the driver wrote.
    pub fn driver_features(&self, select: u32) -> u32 {
        let f = self.lock().driver_features;
        match select {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 feature bits at `select`; ignored once FEATURES_OK is set.
    pub fn set_driver_features(&self, select: u32, v: u32) {
        let mut st = self.lock();
        if st.status & status::FEATURES_OK != 0 {
            return;
        }
        match select {
            0 => st.driver_features = (st.driver_features & !0xffff_ffff) | u64::from(v),
            1 => st.driver_features = (st.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The configuration generation: changes when the device changes its config space.
    pub fn config_generation(&self) -> u32 {
        self.lock().config_generation
    }

    /// The interrupt status bits ([`INT_USED_RING`], [`INT_CONFIG_CHANGE`]).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    /// The driver acknowledged interrupt status bits `bits`.
    pub fn ack_interrupt(&self, bits: u32) {
        self.interrupt_status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Reads and clears the interrupt status (virtio-pci's ISR).
    pub fn take_interrupt_status(&self) -> u32 {
        self.interrupt_status.swap(0, Ordering::AcqRel)
    }

    /// Device configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().device.read_config(offset, data);
    }

    pub fn write_config(&self, offset: u64, data: &[u8]) {
        self.lock().device.write_config(offset, data);
    }

    /// Runs `f` on queue `index` while the driver may still set queues up (before
    /// DRIVER_OK); None when there is no such queue or it is too late. A set-up the
    /// queue refuses (`f` returns false) puts the device in NEEDS_RESET.
    pub fn setup_queue<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut Queue) -> Result<R, String>,
    ) -> Option<R> {
        let mut st = self.lock();
        if st.status & status::DRIVER_OK != 0 {
            tracing::debug!(index, "queue set-up after DRIVER_OK ignored");
            return None;
        }
        let q = st.queues.get_mut(index)?;
        match f(q) {
            Ok(r) => Some(r),
            Err(why) => {
                self.fail(&mut st, format_args!("queue {index}: {why}"));
                None
            }
        }
    }

    /// [`DeviceCore::setup_queue`] for a set-up that cannot be refused.
    pub fn set_queue(&self, index: usize, f: impl FnOnce(&mut Queue)) {
        self.setup_queue(index, |q| {
            f(q);
            Ok(())
        });
    }

    /// Reads queue `index`'s state; None when there is no such queue.
    pub fn read_queue<R>(&self, index: usize, f: impl FnOnce(&Queue) -> R) -> Option<R> {
        self.lock().queues.get(index).map(f)
    }

    /// The driver wrote the device status: 0 resets the device (waiting for requests in
    /// flight), FEATURES_OK is refused for features never offered or without VERSION_1.
    /// Returns the queues to run now that the driver set DRIVER_OK
    /// ([`crate::VirtioDevice::queues_at_driver_ok`]): the caller rings their doorbells.
    #[must_use]
    pub fn write_status(&self, v: u32) -> Vec<usize> {
        // A reset waits for requests running outside the device lock: once the driver
        // reads status 0 back, the device no longer writes its memory.
        let _in_flight = (v == 0).then(|| self.lock_all_in_flight());
        let mut st = self.lock();
        if v == 0 {
            // Requests of the rings being reset: never served now.
            for d in &self.deferred {
                d.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
            for q in &mut st.queues {
                q.reset();
            }
            st.signalled.fill(0);
            for m in &mut st.moderation {
                m.reset();
            }
            st.device.reset();
            st.driver_features = 0;
            st.status = 0;
            self.interrupt_status.store(0, Ordering::Release);
            drop(st);
            self.interrupt.reset();
            return Vec::new();
        }
        let newly = v & !st.status;
        if newly & status::FEATURES_OK != 0 {
            if st.driver_features & !self.offered != 0
                || st.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted something we never offered, or a legacy interface:
                // leave FEATURES_OK clear so it sees the refusal.
                st.status = v & !status::FEATURES_OK;
                return Vec::new();
            }
            let f = st.driver_features;
            st.device.ack_features(f);
            let event_idx = f & VIRTIO_RING_F_EVENT_IDX != 0;
            for q in &mut st.queues {
                q.set_event_idx(event_idx);
            }
        }
        // NEEDS_RESET is the device's to set and only a reset clears it.
        st.status = v | (st.status & status::DEVICE_NEEDS_RESET);
        if newly & status::DRIVER_OK != 0 {
            st.device.queues_at_driver_ok()
        } else {
            Vec::new()
        }
    }

    fn lock(&self) -> MutexGuard<'_, CoreState> {
        // A panic while holding the lock is a bug already reported; the state is still
        // the best there is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `index`'s `in_flight`; None when there is no such queue.
    fn lock_in_flight(&self, index: usize) -> Option<MutexGuard<'_, ()>> {
        let m = self.in_flight.get(index)?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every queue's `in_flight`, in queue order (the only order in which more than one
    /// is ever taken, so two callers never wait for each other's).
    pub(crate) fn lock_all_in_flight(&self) -> Vec<MutexGuard<'_, ()>> {
        self.in_flight
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    fn deferred(&self, index: usize) -> Option<MutexGuard<'_, Option<Box<dyn crate::QueueWork>>>> {
        let m = self.deferred.get(index)?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.lock().status
    }

    fn interrupt(&self, cause: Cause) {
        let bit = match cause {
            Cause::Queue(_) => INT_USED_RING,
            Cause::Config => INT_CONFIG_CHANGE,
        };
        self.interrupt_status.fetch_or(bit, Ordering::AcqRel);
        self.interrupt.raise(cause);
    }

    /// A queue interrupt now, or when a vCPU halts for completions served
    /// [`crate::WorkDone::at_halt`].
    fn interrupt_queue(&self, index: usize, at_halt: bool) {
        if at_halt && self.interrupt.moderated() {
            self.interrupt_status
                .fetch_or(INT_USED_RING, Ordering::AcqRel);
            self.interrupt.raise_at_halt(Cause::Queue(index));
        } else {
            self.interrupt(Cause::Queue(index));
        }
    }

    /// The device's configuration space changed on the host's side (a disk's new backing
    /// file and capacity): a new configuration generation and, once the driver is running,
    /// a configuration-change interrupt, after which the driver reads it again.
    pub fn config_changed(&self) {
        let mut st = self.lock();
        st.config_generation = st.config_generation.wrapping_add(1);
        if st.status & status::DRIVER_OK != 0 {
            self.interrupt(Cause::Config);
        }
    }

    /// Interrupts the driver for queue `index`'s new used entries if it asked for one,
    /// at once or, on a moderated queue, when the guest is likely done submitting (see
    /// [`Moderation`]).
    fn interrupt_for_used(&self, st: &mut CoreState, index: usize, at_halt: bool) {
        let CoreState {
            queues,
            signalled,
            moderation,
            ..
        } = st;
        let (Some(queue), Some(since)) = (queues.get(index), signalled.get_mut(index)) else {
            return;
        };
        let needs = crate::queue::needs_interrupt(queue, &self.mem, since);
        let m = moderation
            .get_mut(index)
            .filter(|m| m.enabled && queue.event_idx_enabled() && self.interrupt.moderated());
        let Some(m) = m else {
            if needs {
                self.interrupt_queue(index, at_halt);
            }
            return;
        };
        let Some(used_event) = crate::queue::used_event(queue, &self.mem) else {
            if needs {
                self.interrupt_queue(index, at_halt);
            }
            return;
        };
        // Completions the driver has not taken up since it last asked for an interrupt.
        let pending = queue.next_used().wrapping_sub(used_event);
        match m.decide(needs, used_event, pending) {
            Moderated::Nothing => {}
            Moderated::Now => self.interrupt_queue(index, at_halt),
            Moderated::Hold => {
                self.interrupt_status
                    .fetch_or(INT_USED_RING, Ordering::AcqRel);
                // A write's completion waits for its vCPU's halt here too: held only
                // while every vCPU is busy, a probe went out at once whenever another
                // vCPU idled, into the kernel thread that issued the write, and the guest
                // moved the writer to the idle vCPU (one request in `PROBE_EVERY`).
                if at_halt {
                    self.interrupt.raise_at_halt(Cause::Queue(index));
                } else {
                    self.interrupt.raise_held(Cause::Queue(index));
                }
            }
            Moderated::Release => self.interrupt.release_held(),
        }
    }

    /// Enter DEVICE_NEEDS_RESET and tell the driver: the guest handed us something no
    /// correct driver would.
    fn fail(&self, st: &mut CoreState, why: impl std::fmt::Display) {
        tracing::warn!(
            device_type = self.device_type,
            "virtio device needs reset: {why}"
        );
        st.status |= status::DEVICE_NEEDS_RESET;
        st.config_generation = st.config_generation.wrapping_add(1);
        self.interrupt(Cause::Config);
    }

    /// Run the device on queue `index` (the driver's notify, or a backend's readiness).
    /// None when the device did not run: not started, needing a reset, or the queue not
    /// set up.
    pub fn process_queue(&self, index: usize) -> Option<QueueOutcome> {
        let _in_flight = self.lock_in_flight(index)?;
        let mut outcome: Option<QueueOutcome> = None;
        // First what a vCPU took up but left to wait on the host.
        if let Some(used) = self.finish_deferred(index) {
            outcome.get_or_insert_with(QueueOutcome::default).used |= used;
        }
        // Rounds until the ring stays empty: requests the driver adds while a batch runs
        // are taken up without waiting for another notify.
        loop {
            let mut st = self.lock();
            let work = match self.start_locked(&mut st, index)? {
                Round::Done(o, more) => {
                    let all = outcome.get_or_insert_with(QueueOutcome::default);
                    all.used |= o.used;
                    all.bulk |= o.bulk;
                    all.starved = o.starved;
                    all.throttled = o.throttled.or(all.throttled);
                    all.also_process = all.also_process.or(o.also_process);
                    if more {
                        continue;
                    }
                    return outcome;
                }
                Round::Unlocked(work) => work,
            };
            drop(st);
            let done = work.run(&self.mem);
            let throttled = done.throttled;
            let mut st = self.lock();
            let more = self.publish(&mut st, index, done)?;
            let o = outcome.get_or_insert_with(QueueOutcome::default);
            o.used |= more.0;
            if throttled.is_some() {
                // What is left waits for the limiter, not for another round now.
                o.throttled = throttled;
                return outcome;
            }
            // A round that found nothing stops even if the avail index says otherwise (a
            // driver that published an index past its ring).
            if !(more.0 && more.1) {
                return outcome;
            }
        }
    }

    /// Runs and publishes the requests [`DeviceCore::process_inline`] left on queue
    /// `index`, if any (its `in_flight` held); whether anything was used.
    pub(crate) fn finish_deferred(&self, index: usize) -> Option<bool> {
        let work = self.deferred(index)?.take()?;
        let done = work.run(&self.mem);
        let mut st = self.lock();
        let (used, _) = self.publish(&mut st, index, done)?;
        Some(used)
    }

    /// Runs the device on queue `index` on the calling (vCPU) thread as far as it can
    /// without waiting on the host (reads served from the page cache): true when that
    /// was all; false when the caller must wake the I/O thread for the rest (requests
    /// that must wait, requests the driver added meanwhile, a rate limiter's hold), or
    /// to run the queue because the I/O thread is busy with the device now.
    pub fn process_inline(&self, index: usize) -> bool {
        // Only this queue's: another queue's requests may be running meanwhile.
        let Some(Ok(_in_flight)) = self.in_flight.get(index).map(Mutex::try_lock) else {
            return false;
        };
        if self.deferred(index).is_none_or(|d| d.is_some()) {
            return false;
        }
        let mut st = self.lock();
        if !st.device.inline_now(index) {
            return false;
        }
        let mut work = match self.start_locked(&mut st, index) {
            None => return true,
            Some(Round::Done(o, more)) => return !more && o.throttled.is_none(),
            Some(Round::Unlocked(work)) => work,
        };
        drop(st);
        let done = work.run_nowait(&self.mem);
        let throttled = done.throttled.is_some();
        let left = !work.is_empty();
        let mut st = self.lock();
        let more = match self.publish(&mut st, index, done) {
            Some((_, more)) => more,
            // Stopped or failed: nothing left to do.
            None => return true,
        };
        drop(st);
        if left {
            if let Some(mut d) = self.deferred(index) {
                *d = Some(work);
            }
        }
        !(left || more || throttled)
    }

    /// Checks the device and queue are running and lets the device take up the queue.
    fn start_locked(&self, st: &mut CoreState, index: usize) -> Option<Round> {
        if st.status & status::DRIVER_OK == 0 || st.status & status::DEVICE_NEEDS_RESET != 0 {
            return None;
        }
        let CoreState { device, queues, .. } = &mut *st;
        let queue = queues.get_mut(index)?;
        if !queue.ready() {
            return None;
        }
        if !queue.is_valid(&self.mem) {
            self.fail(
                st,
                format_args!("queue {index} is not valid (size or ring addresses)"),
            );
            return None;
        }
        // What the driver had published before the device looked: if it moves on while a
        // starved queue re-arms its notification, the buffers may have come unannounced.
        let avail_before = queue.avail_idx(&self.mem, Ordering::Acquire);
        match device.start_queue(index, queue, &self.mem) {
            Ok(Started::Done(outcome)) => {
                let rearmed = match avail_before {
                    Ok(before) if outcome.starved => {
                        crate::queue::notify_past(queue, &self.mem, before.0)
                    }
                    _ if outcome.host_driven => {
                        crate::queue::suppress_notifications(queue, &self.mem).map(|()| false)
                    }
                    // With EVENT_IDX: avail_event = next_avail, so the driver kicks for
                    // the next request; true when some came in meanwhile.
                    _ => queue
                        .enable_notification(&self.mem)
                        .map(|more| more && outcome.used),
                };
                let more = match rearmed {
                    Ok(more) => more,
                    Err(_) => {
                        self.fail(st, format_args!("queue {index}: rings left guest memory"));
                        return None;
                    }
                };
                if outcome.used {
                    self.interrupt_for_used(st, index, false);
                }
                if let Some(next) = outcome.also_process.filter(|&n| n != index) {
                    self.process_locked(st, next);
                }
                Some(Round::Done(outcome, more))
            }
            Ok(Started::Unlocked(work)) => Some(Round::Unlocked(work)),
            Err(e) => {
                self.fail(st, e);
                None
            }
        }
    }

    /// Puts a batch's completions on the used ring, re-arms the driver's notifications
    /// (avail_event with EVENT_IDX) and interrupts it once if it asked (used_event). Returns (anything used, more requests already waiting); None when
    /// the device stopped or failed.
    fn publish(&self, st: &mut CoreState, index: usize, done: WorkDone) -> Option<(bool, bool)> {
        if st.status & status::DRIVER_OK == 0 || st.status & status::DEVICE_NEEDS_RESET != 0 {
            return None;
        }
        let queue = st.queues.get_mut(index)?;
        let used = !done.used.is_empty();
        let published = done.used.iter().try_for_each(|&(head, len)| {
            queue
                .add_used(&self.mem, head, len)
                .map_err(|_| crate::DeviceError::BadRequest("cannot add to the used ring"))
        });
        if let Err(e) = published.and(done.error.map_or(Ok(()), Err)) {
            self.fail(st, e);
            return None;
        }
        // With EVENT_IDX this publishes avail_event = next_avail: the driver kicks for
        // the next request it adds; true means some came in while the batch ran.
        let more = match queue.enable_notification(&self.mem) {
            Ok(more) => more,
            Err(_) => {
                self.fail(st, format_args!("queue {index}: rings left guest memory"));
                return None;
            }
        };
        if used {
            self.interrupt_for_used(st, index, done.at_halt);
        }
        Some((used, more))
    }

    /// Runs a queue another queue's work asked for, with the device lock already held
    /// (only devices served entirely under the lock do that).
    fn process_locked(&self, st: &mut CoreState, index: usize) -> Option<QueueOutcome> {
        match self.start_locked(st, index)? {
            Round::Done(o, _) => Some(o),
            Round::Unlocked(work) => {
                // Already under the lock: run it here rather than lose the requests.
                let done = work.run(&self.mem);
                let (used, _) = self.publish(st, index, done)?;
                Some(QueueOutcome {
                    used,
                    ..QueueOutcome::default()
                })
            }
        }
    }
}

/// The doorbells between a transport and its I/O thread: an eventfd per queue, written
/// by a notify that reaches the transport, or directly by the accelerator when the VMM
/// registered it as an ioevent for the queue (see [`IoThread::queue_notifiers`]).
#[derive(Debug)]
struct Kick {
    notify: Vec<EventFd>,
}

impl Kick {
    fn ring(&self, queue: u32) {
        let Some(fd) = self.notify.get(queue as usize) else {
            return;
        };
        if let Err(e) = fd.write(1) {
            tracing::warn!("virtio I/O thread wake-up: {e}");
        }
    }
}

/// Where a transport's queue notifies go: to the device on the notifying thread, or,
/// once [`Doorbell::io_thread`] made one, to the device's I/O thread.
#[derive(Debug)]
pub struct Doorbell {
    core: Arc<DeviceCore>,
    kick: Option<Arc<Kick>>,
    /// The queues (a bit each) whose notifies first run the device on the notifying
    /// thread as far as it goes without waiting ([`Doorbell::serve_inline`]).
    inline: u64,
}

impl Doorbell {
    pub fn new(core: Arc<DeviceCore>) -> Self {
        Doorbell {
            core,
            kick: None,
            inline: 0,
        }
    }

    /// The driver notified queue `queue`.
    pub fn ring(&self, queue: u32) {
        match &self.kick {
            Some(kick) => {
                // Only when no ioevent took the write first.
                tracing::trace!(queue, "queue notify through the transport");
                if !(self.serves_inline(queue) && self.core.process_inline(queue as usize)) {
                    kick.ring(queue)
                }
            }
            None => {
                self.core.process_queue(queue as usize);
            }
        }
    }

    /// From now on a notify first serves on the notifying vCPU what needs no waiting on
    /// the host (a read from the page cache: done before the guest's next instruction,
    /// no thread woken, the submitter need not even sleep), and wakes the I/O thread
    /// only for the rest. For accelerators whose MMIO exits stay in the vCPU thread (a
    /// software CPU); the VMM then registers no ioevent for the queues. With an I/O
    /// thread only.
    /// Only the queues the device serves so ([`crate::VirtioDevice::serves_inline`]):
    /// the VMM registers ioevents for the others ([`Doorbell::serves_inline`]).
    /// False (and nothing changes) when the device has no such queue or there is no I/O
    /// thread.
    pub fn serve_inline(&mut self) -> bool {
        self.inline = 0;
        if self.kick.is_some() {
            let st = self.core.lock();
            for i in 0..st.queues.len().min(64) {
                if st.device.serves_inline(i) {
                    self.inline |= 1 << i;
                }
            }
        }
        self.inline != 0
    }

    /// Whether notifies of queue `queue` are served on the notifying thread first (after
    /// [`Doorbell::serve_inline`]).
    pub fn serves_inline(&self, queue: u32) -> bool {
        1u64.checked_shl(queue)
            .is_some_and(|b| self.inline & b != 0)
    }

    /// Whether an I/O thread serves the device.
    pub fn has_io_thread(&self) -> bool {
        self.kick.is_some()
    }

    /// From now on the driver's notifies only wake the returned I/O thread, which runs
    /// the device, and which also waits for `host_input` (a TAP, vsock's host sockets).
    pub fn io_thread(
        &mut self,
        name: &str,
        host_input: Option<Box<dyn HostInput>>,
    ) -> std::io::Result<IoThread> {
        let notify = (0..self.core.num_queues())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let kick = Arc::new(Kick { notify });
        self.kick = Some(kick.clone());
        Ok(IoThread {
            name: name.to_string(),
            core: self.core.clone(),
            kick,
            host_input,
            coalesce: None,
            host_queue: None,
            role: sandbox::Role::Io,
            queues: (0..self.core.num_queues()).collect(),
            siblings: Vec::new(),
        })
    }
}

/// Lets the VMM keep the I/O threads out of guest memory while the VM is paused: a
/// thread enters before serving and leaves after; closing waits for those inside, and a
/// thread that finds the gate closed sleeps until it opens or the VM ends.
#[derive(Debug, Default)]
pub struct IoGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    inside: usize,
}

impl IoGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the caller may serve now; if so it must call [`IoGate::leave`] after.
    pub fn enter(&self) -> bool {
        let mut st = self.state();
        if st.closed {
            return false;
        }
        st.inside += 1;
        true
    }

    pub fn leave(&self) {
        let mut st = self.state();
        st.inside = st.inside.saturating_sub(1);
        if st.inside == 0 && st.closed {
            self.changed.notify_all();
        }
    }

    /// Closes the gate and waits until no thread is serving; false if one still is after
    /// `timeout` (the gate stays closed).
    pub fn close(&self, timeout: Duration) -> bool {
        let mut st = self.state();
        st.closed = true;
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.inside > 0)
            .unwrap_or_else(|p| p.into_inner());
        st.inside == 0
    }

    pub fn open(&self) {
        self.state().closed = false;
        self.changed.notify_all();
    }

    /// Sleeps while the gate is closed, until it opens or `exit` is set (whoever sets it
    /// calls [`IoGate::wake`] after).
    pub fn wait_open(&self, exit: &ExitSignal) {
        let st = self.state();
        let _st = self
            .changed
            .wait_while(st, |st| st.closed && exit.get().is_none())
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Wakes the threads in [`IoGate::wait_open`] to look at the VM's exit signal.
    pub fn wake(&self) {
        let _st = self.state();
        self.changed.notify_all();
    }
}

/// What a device's I/O thread waits for from the host, besides the driver's notifies.
pub trait HostInput: Send {
    /// Appends the descriptors to wait on now (for readability). Asked again after
    /// every wake-up, so the set may change (vsock's connections).
    fn fds(&mut self, out: &mut Vec<RawFd>);
    /// Some of them polled ready (`revents`, in the order `fds` gave them): take in what
    /// the host has; returns the queue to run for it, if any.
    fn ready(&mut self, revents: &[i16]) -> Option<usize>;
}

/// One descriptor that polls readable when the host has input for `queue` (a TAP for a
/// receive queue). Left alone once it reports an error or hang-up.
#[derive(Debug)]
pub struct FdInput {
    fd: Option<OwnedFd>,
    queue: usize,
}

impl FdInput {
    pub fn new(fd: OwnedFd, queue: usize) -> Self {
        FdInput {
            fd: Some(fd),
            queue,
        }
    }
}

impl HostInput for FdInput {
    fn fds(&mut self, out: &mut Vec<RawFd>) {
        out.extend(self.fd.as_ref().map(|fd| fd.as_raw_fd()));
    }

    fn ready(&mut self, revents: &[i16]) -> Option<usize> {
        let r = revents.first().copied().unwrap_or(0);
        if r & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            tracing::warn!("host input descriptor failed; no more host input");
            self.fd = None;
            return None;
        }
        (r & libc::POLLIN != 0).then_some(self.queue)
    }
}

/// A device's I/O thread, not yet started: it waits for the driver's notifies and, if
/// the device has one, for its host input, and runs the device on them.
pub struct IoThread {
    name: String,
    core: Arc<DeviceCore>,
    kick: Arc<Kick>,
    host_input: Option<Box<dyn HostInput>>,
    /// A queue whose notifies are served this long after the first one (see
    /// [`IoThread::coalesce`]).
    coalesce: Option<(usize, Duration)>,
    /// The queue host input last went to: while a rate limiter holds it, host input
    /// waits too.
    host_queue: Option<usize>,
    /// The seccomp role the thread confines itself to when it starts.
    role: sandbox::Role,
    /// The queues whose notifies this thread serves (all of the device's, but those
    /// [`IoThread::split_off`] gave to a sibling).
    queues: Vec<usize>,
    /// Threads started with this one, each serving queues of its own
    /// ([`IoThread::split_off`]).
    siblings: Vec<IoThread>,
}

/// Queues of a device served by an I/O thread of their own beside the device's first
/// ([`IoThread::split_off`]): a queue pair of a multi-queue NIC, with its TAP queue.
pub struct QueueGroup {
    /// The thread's name.
    pub name: String,
    /// The queues it serves.
    pub queues: Vec<usize>,
    /// Its host input (the pair's TAP queue).
    pub host_input: Option<Box<dyn HostInput>>,
    /// A queue it coalesces ([`IoThread::coalesce`]).
    pub coalesce: Option<(usize, Duration)>,
}

impl std::fmt::Debug for QueueGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGroup")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// How many coalescing delays without a notify make a quiet spell, after which the next
/// notify is served at once (a streaming sender notifies more often than that, one that
/// answers requests less).
const QUIET_DELAYS: u32 = 10;

/// The timer that brings back queues a rate limiter stopped
/// ([`crate::QueueOutcome::throttled`]).
struct Throttle {
    timer: vmm_sys_util::timerfd::TimerFd,
    /// When it fires (None: not armed).
    due: Option<std::time::Instant>,
    /// The queues to run then (a bit each).
    queues: u64,
    /// Host input is left unread until then (its descriptors stay readable).
    host: bool,
}

impl Throttle {
    /// Runs `queue` again after `wait` (or earlier, with the others already waiting).
    fn hold(&mut self, queue: usize, wait: Duration, host: bool) {
        self.queues |= 1u64.checked_shl(queue as u32).unwrap_or(0);
        self.host |= host;
        let due = std::time::Instant::now() + wait;
        if self.due.is_some_and(|d| d <= due) {
            return;
        }
        // At least a microsecond: a zero timer value disarms it.
        match self.timer.reset(wait.max(Duration::from_micros(1)), None) {
            Ok(()) => self.due = Some(due),
            Err(e) => tracing::warn!("rate limiter timer: {e}"),
        }
    }
}

/// The coalescing timer of an I/O thread, while it has a queue to coalesce.
struct Coalesce {
    queue: usize,
    delay: Duration,
    timer: vmm_sys_util::timerfd::TimerFd,
    armed: bool,
    /// When the driver last notified the queue.
    last_notify: Option<std::time::Instant>,
    /// The queue's last round moved bulk data ([`crate::QueueOutcome::bulk`]).
    bulk: bool,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .field("host_input", &self.host_input.is_some())
            .finish_non_exhaustive()
    }
}

impl IoThread {
    /// Each queue's doorbell: the VMM registers each as an ioevent where the transport
    /// takes that queue's notify (virtio-mmio: the window's
    /// [`crate::mmio::QUEUE_NOTIFY_OFFSET`] for a write of the queue's index), so a
    /// notify wakes this thread without reaching the transport.
    pub fn queue_notifiers(&self) -> impl Iterator<Item = (u32, &hypervisor::EventFd)> {
        self.kick
            .notify
            .iter()
            .enumerate()
            .map(|(i, fd)| (i as u32, fd))
    }

    /// Moderates queue `queue` as a NIC moderates its transmit completions: the first
    /// notify after a quiet spell (no notify for ten times `delay`), or after a round that
    /// moved no bulk data ([`crate::QueueOutcome::bulk`]: small request/response frames),
    /// is served at once, later ones `delay` after they come. What the driver adds meanwhile goes in the same
    /// round (with EVENT_IDX it does not even notify), and its buffers come back later,
    /// which lets a guest's TCP coalesce small writes into large segments (autocorking)
    /// instead of sending each as a frame of its own.
    /// The thread confines itself to `role` rather than [`sandbox::Role::Io`] (vsock's,
    /// which connects to host sockets).
    pub fn confine_as(&mut self, role: sandbox::Role) {
        self.role = role;
    }

    pub fn coalesce(&mut self, queue: usize, delay: Duration) {
        self.coalesce = Some((queue, delay));
    }

    /// Gives `group`'s queues to a thread of their own, started with this one (same
    /// device, same doorbells and seccomp role): the queue pairs of a multi-queue NIC
    /// are served side by side, each with its own TAP queue, as the guest's CPUs use
    /// them side by side. Queues this thread does not serve are ignored.
    pub fn split_off(&mut self, group: QueueGroup) {
        let queues: Vec<usize> = group
            .queues
            .into_iter()
            .filter(|q| self.queues.contains(q))
            .collect();
        self.queues.retain(|q| !queues.contains(q));
        self.siblings.push(IoThread {
            name: group.name,
            core: self.core.clone(),
            kick: self.kick.clone(),
            host_input: group.host_input,
            coalesce: group.coalesce,
            host_queue: None,
            role: self.role,
            queues,
            siblings: Vec::new(),
        });
    }

    /// Start the thread; it ends once `exit` is set, and serves nothing while `gate` is
    /// closed.
    /// Its siblings ([`IoThread::split_off`]) start too, and the handle joins them.
    pub fn spawn(
        mut self,
        exit: Arc<ExitSignal>,
        gate: Arc<IoGate>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let siblings = std::mem::take(&mut self.siblings)
            .into_iter()
            .map(|t| t.spawn(exit.clone(), gate.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let exit_fd = exit.subscribe()?;
        std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                sandbox::enter(self.role);
                self.run(&exit, &exit_fd, &gate);
                for t in siblings {
                    let _ = t.join();
                }
            })
    }

    /// Serve the device until `exit` is set (`exit_fd`, its subscription, turns readable).
    fn run(mut self, exit: &ExitSignal, exit_fd: &EventFd, gate: &IoGate) {
        // The queue host input last went to, while it waits for guest buffers: the host
        // descriptors stay readable, so they are left out of the poll until that
        // queue's next notify.
        let mut starved: Option<usize> = None;
        let mut coalesce = match self.coalesce.take() {
            Some((queue, delay)) => match vmm_sys_util::timerfd::TimerFd::new() {
                Ok(timer) => Some(Coalesce {
                    queue,
                    delay,
                    timer,
                    armed: false,
                    last_notify: None,
                    bulk: false,
                }),
                Err(e) => {
                    tracing::warn!(thread = self.name, "no coalescing timer: {e}");
                    None
                }
            },
            None => None,
        };
        let mut throttle = match vmm_sys_util::timerfd::TimerFd::new() {
            Ok(timer) => Some(Throttle {
                timer,
                due: None,
                queues: 0,
                host: false,
            }),
            Err(e) => {
                tracing::warn!(thread = self.name, "no rate limiter timer: {e}");
                None
            }
        };
        let queues = self.queues.len();
        let mut fds: Vec<RawFd> = Vec::new();
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        while exit.get().is_none() {
            fds.clear();
            fds.push(exit_fd.as_raw_fd());
            fds.extend(
                self.queues
                    .iter()
                    .map(|&q| self.kick.notify.get(q).map_or(-1, |fd| fd.as_raw_fd())),
            );
            // Always present (-1 is ignored by poll), so host descriptors start after them.
            fds.push(coalesce.as_ref().map_or(-1, |c| c.timer.as_raw_fd()));
            fds.push(throttle.as_ref().map_or(-1, |t| t.timer.as_raw_fd()));
            let host_held = throttle.as_ref().is_some_and(|t| t.host);
            if let (Some(h), None, false) = (self.host_input.as_mut(), starved, host_held) {
                h.fds(&mut fds);
            }
            pfds.clear();
            pfds.extend(fds.iter().map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `pfds` is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(thread = self.name, "poll: {e}; the device stops");
                    return;
                }
                continue;
            }
            if pfds.first().is_some_and(|p| p.revents != 0) {
                return;
            }
            if !gate.enter() {
                // Paused: notifies and host input wait (their descriptors stay readable).
                gate.wait_open(exit);
                continue;
            }
            let notified = pfds.get(1..=queues).unwrap_or_default();
            let timer_fired = pfds.get(queues + 1).is_some_and(|p| p.revents != 0);
            let throttle_fired = pfds.get(queues + 2).is_some_and(|p| p.revents != 0);
            let host = pfds.get(queues + 3..).unwrap_or_default();
            let mut held = Vec::new();
            if let Some(t) = throttle.as_mut().filter(|_| throttle_fired) {
                let _ = t.timer.wait();
                t.due = None;
                held = (0..64).filter(|q| t.queues & (1u64 << q) != 0).collect();
                t.queues = 0;
                t.host = false;
            }
            let stopped = self.serve(
                notified,
                timer_fired,
                &held,
                host,
                &mut starved,
                coalesce.as_mut(),
            );
            for (q, wait, host) in stopped {
                match throttle.as_mut() {
                    Some(t) => t.hold(q, wait, host),
                    // No timer: wait here rather than spin on the queue.
                    None => std::thread::sleep(wait),
                }
            }
            gate.leave();
        }
    }

    /// Runs the queues that were notified (or arms the coalescing timer for its queue,
    /// and runs that one when the timer fired), those a rate limiter held back until now
    /// (`held`), and host input if there is some. Returns the queues a rate limiter
    /// stopped: (queue, how long, whether host input waits too).
    fn serve(
        &mut self,
        notified: &[libc::pollfd],
        timer_fired: bool,
        held: &[usize],
        host: &[libc::pollfd],
        starved: &mut Option<usize>,
        mut coalesce: Option<&mut Coalesce>,
    ) -> Vec<(usize, Duration, bool)> {
        let mut done = 0u64;
        let mut stopped = Vec::new();
        let host_queue = self.host_queue;
        let mut run: Vec<usize> = held.to_vec();
        for (i, p) in notified.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let Some(&q) = self.queues.get(i) else {
                continue;
            };
            // Clears the doorbell before the device looks at the ring: a notify after
            // this is seen by the next poll.
            if let Some(fd) = self.kick.notify.get(q) {
                let _ = fd.read();
            }
            match coalesce.as_deref_mut() {
                Some(c) if c.queue == q => {
                    // The first notify after a quiet spell is served at once; while
                    // notifies keep coming, each waits `delay`.
                    let now = std::time::Instant::now();
                    let quiet = !c.bulk
                        || c.last_notify
                            .is_none_or(|t| now.duration_since(t) >= c.delay * QUIET_DELAYS);
                    c.last_notify = Some(now);
                    if c.armed {
                    } else if quiet {
                        run.push(q);
                    } else if c.timer.reset(c.delay, None).is_ok() {
                        c.armed = true;
                    } else {
                        // Serve it now rather than not at all.
                        run.push(q);
                    }
                }
                _ => run.push(q),
            }
        }
        if let Some(c) = coalesce.as_deref_mut().filter(|_| timer_fired) {
            let _ = c.timer.wait();
            c.armed = false;
            if !run.contains(&c.queue) {
                run.push(c.queue);
            }
        }
        run.dedup();
        for q in run {
            if done & 1u64.checked_shl(q as u32).unwrap_or(0) != 0 {
                continue;
            }
            let outcome = self.core.process_queue(q);
            if let Some(c) = coalesce.as_deref_mut().filter(|c| c.queue == q) {
                c.bulk = outcome.is_some_and(|o| o.bulk);
            }
            if *starved == Some(q) || outcome.is_some_and(|o| o.starved) {
                *starved = outcome.is_none_or(|o| o.starved).then_some(q);
            }
            if let Some(wait) = outcome.and_then(|o| o.throttled) {
                stopped.push((q, wait, Some(q) == host_queue));
            }
            done |= 1u64.checked_shl(q as u32).unwrap_or(0);
        }
        if host.iter().all(|p| p.revents == 0) {
            return stopped;
        }
        let revents: Vec<i16> = host.iter().map(|p| p.revents).collect();
        let Some(q) = self.host_input.as_mut().and_then(|h| h.ready(&revents)) else {
            return stopped;
        };
        self.host_queue = Some(q);
        if done & 1u64.checked_shl(q as u32).unwrap_or(0) == 0 {
            let outcome = self.core.process_queue(q);
            *starved = outcome.is_none_or(|o| o.starved).then_some(q);
            if let Some(wait) = outcome.and_then(|o| o.throttled) {
                stopped.push((q, wait, true));
            }
        }
        stopped
    }
}

#[cfg(test)]
mod moderation_tests {
    use super::{Moderated, Moderation, PROBE_EVERY};

    /// A driver that re-arms used_event at the used index after each interrupt, as
    /// Linux does; `decide` for each completion, in order.
    #[test]
    fn one_request_at_a_time_is_never_held_but_for_probes() {
        let mut m = Moderation::new(true);
        let mut held = 0;
        for i in 0..(3 * PROBE_EVERY) {
            // used_event = i (the driver took up everything), one completion pending.
            match m.decide(true, i, 1) {
                Moderated::Now => {}
                Moderated::Hold => held += 1,
                other => panic!("request {i}: {other:?}"),
            }
            assert_eq!(m.depth, 1);
        }
        assert_eq!(held, 3, "one probe every {PROBE_EVERY} interrupts");
    }

    #[test]
    fn a_probe_learns_the_depth_and_later_batches_go_out_when_complete() {
        let mut m = Moderation::new(true);
        let mut event = 0u16;
        // Up to the probe, requests one at a time.
        while m.decide(true, event, 1) == Moderated::Now {
            event = event.wrapping_add(1);
        }
        // The probe's interrupt is held to the halt: meanwhile three more complete,
        // each without the driver asking again.
        for pending in 2..=4 {
            assert_eq!(m.decide(false, event, pending), Moderated::Nothing);
        }
        // The driver took up four: from now on an interrupt waits for four.
        event = event.wrapping_add(4);
        assert_eq!(m.decide(true, event, 1), Moderated::Hold);
        assert_eq!(m.depth, 4);
        assert_eq!(m.decide(false, event, 2), Moderated::Nothing);
        assert_eq!(m.decide(false, event, 3), Moderated::Nothing);
        assert_eq!(m.decide(false, event, 4), Moderated::Release);
        // Released once only.
        assert_eq!(m.decide(false, event, 5), Moderated::Nothing);
        // The guest drops to one at a time: the halt sent the held one with a single
        // completion, and the depth follows.
        event = event.wrapping_add(5);
        assert_eq!(m.decide(true, event, 1), Moderated::Hold);
        event = event.wrapping_add(1);
        assert_eq!(m.decide(true, event, 1), Moderated::Now);
        assert_eq!(m.depth, 1);
    }

    #[test]
    fn hostile_used_event_values_stay_bounded() {
        let mut m = Moderation::new(true);
        m.decide(true, 0, 1);
        // A driver that moves used_event anywhere: the depth stays within its bounds
        // and the queue keeps deciding.
        for e in [u16::MAX, 7, 0x8000, 3, 3, 0] {
            let _ = m.decide(true, e, e.wrapping_add(1));
            assert!((1..=super::MAX_DEPTH).contains(&m.depth));
        }
        m.reset();
        assert_eq!(m.depth, 1);
        assert!(!m.holding);
    }
}
