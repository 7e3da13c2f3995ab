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
//! ([`Doorbell::io_thread`]) the notify only records the queue and wakes the thread,
//! which processes it and raises the interrupt (both the KVM irq ioctls and the emu's
//! user-space chip may be driven from any thread). A driver reset takes the device
//! lock, so it waits for work in progress and the thread then finds the device stopped.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
}

impl<T: Interrupt> Interrupt for Arc<T> {
    fn raise(&self, cause: Cause) {
        (**self).raise(cause)
    }
    fn reset(&self) {
        (**self).reset()
    }
}

/// virtio-mmio's interrupt: an edge on the device's GSI.
pub struct GsiEdge {
    pub irq: Arc<dyn hypervisor::IrqChip>,
    pub gsi: u32,
}

impl std::fmt::Debug for GsiEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiEdge").field("gsi", &self.gsi).finish()
    }
}

impl Interrupt for GsiEdge {
    fn raise(&self, _cause: Cause) {
        if let Err(e) = self.irq.pulse_irq_line(self.gsi) {
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

/// What the device lock guards.
struct CoreState {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

/// A device, its queues and its interrupt, shared between the transport's registers and
/// whichever thread runs the device.
pub struct DeviceCore {
    state: Mutex<CoreState>,
    /// Held by whoever runs a device's work outside `state` (disk I/O), and by a driver
    /// reset, which so waits for work in progress. Always taken before `state`.
    in_flight: Mutex<()>,
    interrupt_status: AtomicU32,
    mem: GuestMemoryMmap,
    interrupt: Box<dyn Interrupt>,
    device_type: u32,
    /// What the transport offers: the device's features and VERSION_1.
    offered: u64,
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
        DeviceCore {
            state: Mutex::new(CoreState {
                device,
                queues,
                driver_features: 0,
                status: 0,
                config_generation: 0,
            }),
            in_flight: Mutex::new(()),
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
    pub fn write_status(&self, v: u32) {
        // A reset waits for requests running outside the device lock: once the driver
        // reads status 0 back, the device no longer writes its memory.
        let _in_flight = (v == 0).then(|| self.lock_in_flight());
        let mut st = self.lock();
        if v == 0 {
            for q in &mut st.queues {
                q.reset();
            }
            st.device.reset();
            st.driver_features = 0;
            st.status = 0;
            self.interrupt_status.store(0, Ordering::Release);
            drop(st);
            self.interrupt.reset();
            return;
        }
        let newly = v & !st.status;
        if newly & status::FEATURES_OK != 0 {
            if st.driver_features & !self.offered != 0
                || st.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted something we never offered, or a legacy interface:
                // leave FEATURES_OK clear so it sees the refusal.
                st.status = v & !status::FEATURES_OK;
                return;
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
    }

    fn lock(&self) -> MutexGuard<'_, CoreState> {
        // A panic while holding the lock is a bug already reported; the state is still
        // the best there is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_in_flight(&self) -> MutexGuard<'_, ()> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
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
        let _in_flight = self.lock_in_flight();
        let mut outcome: Option<QueueOutcome> = None;
        // Rounds until the ring stays empty: requests the driver adds while a batch runs
        // are taken up without waiting for another notify.
        loop {
            let mut st = self.lock();
            let work = match self.start_locked(&mut st, index)? {
                Started::Done(o) => return Some(o),
                Started::Unlocked(work) => work,
            };
            drop(st);
            let done = work.run(&self.mem);
            let mut st = self.lock();
            let more = self.publish(&mut st, index, done)?;
            let o = outcome.get_or_insert_with(QueueOutcome::default);
            o.used |= more.0;
            // A round that found nothing stops even if the avail index says otherwise (a
            // driver that published an index past its ring).
            if !(more.0 && more.1) {
                return outcome;
            }
        }
    }

    /// Checks the device and queue are running and lets the device take up the queue.
    fn start_locked(&self, st: &mut CoreState, index: usize) -> Option<Started> {
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
        match device.start_queue(index, queue, &self.mem) {
            Ok(Started::Done(outcome)) => {
                if outcome.used && queue.needs_notification(&self.mem).unwrap_or(true) {
                    self.interrupt(Cause::Queue(index));
                }
                if let Some(next) = outcome.also_process.filter(|&n| n != index) {
                    self.process_locked(st, next);
                }
                Some(Started::Done(outcome))
            }
            Ok(work) => Some(work),
            Err(e) => {
                self.fail(st, e);
                None
            }
        }
    }

    /// Puts a batch's completions on the used ring, interrupts the driver once if it asked (used_event with EVENT_IDX), and re-arms its notifications
    /// (avail_event). Returns (anything used, more requests already waiting); None when
    /// the device stopped or failed.
    fn publish(&self, st: &mut CoreState, index: usize, done: WorkDone) -> Option<(bool, bool)> {
        if st.status & status::DRIVER_OK == 0 || st.status & status::DEVICE_NEEDS_RESET != 0 {
            return None;
        }
        let queue = st.queues.get_mut(index)?;
        let used = !done.used.is_empty();
        // One add_used each (not queue::add_used_batch): virtio-queue counts them for
        // its used_event test below, and blk's completions are independent of each other.
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
        if used && queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt(Cause::Queue(index));
        }
        Some((used, more))
    }

    /// Runs a queue another queue's work asked for, with the device lock already held
    /// (only devices served entirely under the lock do that).
    fn process_locked(&self, st: &mut CoreState, index: usize) -> Option<QueueOutcome> {
        match self.start_locked(st, index)? {
            Started::Done(o) => Some(o),
            Started::Unlocked(work) => {
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

/// The doorbell between a transport and its I/O thread: which queues were notified.
#[derive(Debug)]
struct Kick {
    pending: AtomicU64,
    event: EventFd,
}

impl Kick {
    fn ring(&self, queue: u32) {
        let Some(bit) = 1u64.checked_shl(queue) else {
            return;
        };
        // The thread takes all bits at once after waking: only the first notify since
        // then needs to wake it.
        if self.pending.fetch_or(bit, Ordering::AcqRel) == 0 {
            if let Err(e) = self.event.write(1) {
                tracing::warn!("virtio I/O thread wake-up: {e}");
            }
        }
    }
}

/// Where a transport's queue notifies go: to the device on the notifying thread, or,
/// once [`Doorbell::io_thread`] made one, to the device's I/O thread.
#[derive(Debug)]
pub struct Doorbell {
    core: Arc<DeviceCore>,
    kick: Option<Arc<Kick>>,
}

impl Doorbell {
    pub fn new(core: Arc<DeviceCore>) -> Self {
        Doorbell { core, kick: None }
    }

    /// The driver notified queue `queue`.
    pub fn ring(&self, queue: u32) {
        match &self.kick {
            Some(kick) => kick.ring(queue),
            None => {
                self.core.process_queue(queue as usize);
            }
        }
    }

    /// Whether an I/O thread serves the device.
    pub fn has_io_thread(&self) -> bool {
        self.kick.is_some()
    }

    /// From now on the driver's notifies only wake the returned I/O thread, which runs
    /// the device. `host_input` is a descriptor that polls readable when the host has
    /// input for queue `.1` (a TAP for a receive queue).
    pub fn io_thread(
        &mut self,
        name: &str,
        host_input: Option<(OwnedFd, usize)>,
    ) -> std::io::Result<IoThread> {
        let kick = Arc::new(Kick {
            pending: AtomicU64::new(0),
            event: EventFd::new(EFD_NONBLOCK)?,
        });
        self.kick = Some(kick.clone());
        Ok(IoThread {
            name: name.to_string(),
            core: self.core.clone(),
            kick,
            host_input,
        })
    }
}

/// How long an I/O thread sleeps between looks at the VM's exit signal, and between
/// retries of host input the device could not take.
const IO_THREAD_TICK: Duration = Duration::from_millis(100);

/// Lets the VMM keep the I/O threads out of guest memory while the VM is paused: a
/// thread enters before serving and leaves after; closing waits for those inside.
#[derive(Debug, Default)]
pub struct IoGate {
    closed: std::sync::atomic::AtomicBool,
    inside: std::sync::atomic::AtomicUsize,
}

impl IoGate {
    /// Whether the caller may serve now; if so it must call [`IoGate::leave`] after.
    pub fn enter(&self) -> bool {
        // Counted before the check: a closer that then sees no one inside is sure any
        // later entrant sees it closed.
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.inside.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }

    /// Closes the gate and waits until no thread is serving; false if one still is after
    /// `timeout` (the gate stays closed).
    pub fn close(&self, timeout: Duration) -> bool {
        self.closed.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while self.inside.load(Ordering::SeqCst) > 0 {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}

/// A device's I/O thread, not yet started: it waits for the driver's notifies and, if
/// the device has one, for its host input, and runs the device on them.
pub struct IoThread {
    name: String,
    core: Arc<DeviceCore>,
    kick: Arc<Kick>,
    host_input: Option<(OwnedFd, usize)>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .field("host_input_queue", &self.host_input.as_ref().map(|h| h.1))
            .finish_non_exhaustive()
    }
}

impl IoThread {
    /// Start the thread; it ends once `exit` is set, and serves nothing while `gate` is
    /// closed.
    pub fn spawn(
        self,
        exit: Arc<ExitSignal>,
        gate: Arc<IoGate>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || self.run(&exit, &gate))
    }

    /// Serve the device until `exit` is set.
    pub fn run(mut self, exit: &ExitSignal, gate: &IoGate) {
        // Set while host input waits for guest buffers: the host descriptor stays
        // readable, so it is left out of the poll until the driver's next notify.
        let mut starved = false;
        let mut last_try = Instant::now();
        while exit.get().is_none() {
            let host_fd = match &self.host_input {
                Some((fd, _)) if !starved => fd.as_raw_fd(),
                _ => -1,
            };
            let mut pfds = [
                libc::pollfd {
                    fd: self.kick.event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: host_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `pfds` is a valid array of two pollfd for the duration of the call.
            let n = unsafe {
                libc::poll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    IO_THREAD_TICK.as_millis() as libc::c_int,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(thread = self.name, "poll: {e}");
                    std::thread::sleep(IO_THREAD_TICK);
                }
                continue;
            }
            if !gate.enter() {
                // Paused: leave notifies and host input waiting until the gate opens.
                std::thread::sleep(IO_THREAD_TICK / 10);
                continue;
            }
            self.serve(&pfds, &mut starved, &mut last_try);
            gate.leave();
        }
    }

    /// Runs the queues that were notified, and host input if there is some.
    fn serve(&mut self, pfds: &[libc::pollfd; 2], starved: &mut bool, last_try: &mut Instant) {
        if pfds[0].revents & libc::POLLIN != 0 {
            // Only clears the wake-up; `pending` says which queues.
            let _ = self.kick.event.read();
        }
        let host_queue = self.host_input.as_ref().map(|h| h.1);
        let mut host_done = false;
        let mut pending = self.kick.pending.swap(0, Ordering::AcqRel);
        while pending != 0 {
            let q = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let outcome = self.core.process_queue(q);
            if host_queue == Some(q) {
                *starved = outcome.is_none_or(|o| o.starved);
                *last_try = Instant::now();
                host_done = true;
            }
        }
        let Some(hq) = host_queue else { return };
        if pfds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            tracing::warn!(
                thread = self.name,
                "host input descriptor failed; no more host input"
            );
            self.host_input = None;
            return;
        }
        let readable = pfds[1].revents & libc::POLLIN != 0;
        let retry = *starved && last_try.elapsed() >= IO_THREAD_TICK;
        if !host_done && (readable || retry) {
            let outcome = self.core.process_queue(hq);
            *starved = outcome.is_none_or(|o| o.starved);
            *last_try = Instant::now();
        }
    }
}
