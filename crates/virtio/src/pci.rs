//! The virtio-pci transport, modern interface only (virtio 1.x, spec 4.1): a PCI
//! function with vendor 0x1af4 and device 0x1040 + the virtio device type, whose
//! vendor-specific capabilities point into one memory BAR.
//!
//! BAR 0 (32-bit memory, [`BAR_SIZE`]):
//! ```text
//! 0x0000 common configuration (features, status, queue set-up)
//! 0x1000 ISR status (one byte; reading clears it and lowers INTx)
//! 0x2000 device-specific configuration
//! 0x3000 notifications: queue N at 0x3000 + 4 * N
//! 0x4000 MSI-X table (one vector per queue, and one for configuration changes)
//! 0x5000 MSI-X pending bits
//! ```
//! The device itself is the shared [`DeviceCore`]; this module is the register layout
//! and the interrupt path: an MSI-X vector when the driver enabled MSI-X, else INTx
//! (level, on the GSI the DSDT's `_PRT` gives the slot) until the driver reads the ISR.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::config::{self, BarKind, PciConfig, PciIds};
use devices::pci::msix::{self, Hold, Msix};
use devices::pci::PciDevice;
use hypervisor::{IoEventAddress, IrqChip};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::transport::{
    Cause, DeviceCore, Doorbell, HostInput, Interrupt, IoThread, QUEUE_INTERRUPT_HOLD,
};
use crate::{device_type, VirtioDevice};

/// The virtio PCI vendor, and the first modern device ID (0x1040 + device type).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// The subsystem IDs every virtio-pci function reports.
const SUBSYSTEM_ID: u16 = 0x1100;

/// BAR 0's regions.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// virtio_pci_cap.cfg_type values (4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// The vendor-specific capability ID.
const CAP_VENDOR: u8 = 0x09;

/// "No vector" for config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Common configuration offsets (4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;

    /// (start, size) of the field holding `offset`.
    pub fn field(offset: u64) -> Option<(u64, u64)> {
        const FIELDS: [(u64, u64); 16] = [
            (DEVICE_FEATURE_SELECT, 4),
            (DEVICE_FEATURE, 4),
            (DRIVER_FEATURE_SELECT, 4),
            (DRIVER_FEATURE, 4),
            (CONFIG_MSIX_VECTOR, 2),
            (NUM_QUEUES, 2),
            (DEVICE_STATUS, 1),
            (CONFIG_GENERATION, 1),
            (QUEUE_SELECT, 2),
            (QUEUE_SIZE, 2),
            (QUEUE_MSIX_VECTOR, 2),
            (QUEUE_ENABLE, 2),
            (QUEUE_NOTIFY_OFF, 2),
            (QUEUE_DESC, 8),
            (QUEUE_DRIVER, 8),
            (QUEUE_DEVICE, 8),
        ];
        FIELDS
            .iter()
            .copied()
            .find(|&(start, size)| offset >= start && offset < start + size)
    }
}

/// The PCI class code the function reports for a virtio device type.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        device_type::NET => 0x02_00_00,     // network controller, Ethernet
        device_type::BLOCK => 0x01_00_00,   // mass storage, SCSI (as QEMU reports it)
        device_type::CONSOLE => 0x07_80_00, // communication controller, other
        _ => 0x00_ff_00,                    // unclassified
    }
}

/// Which vector each interrupt cause goes to.
#[derive(Debug)]
struct Vectors {
    config: u16,
    queues: Vec<u16>,
}

/// virtio-pci's interrupt: MSI-X when enabled, else the INTx line.
struct PciInterrupt {
    msix: Mutex<Msix>,
    vectors: Mutex<Vectors>,
    irq: Arc<dyn IrqChip>,
    gsi: u32,
    intx_asserted: AtomicBool,
    /// The command register's INTx disable bit.
    intx_disabled: AtomicBool,
}

impl std::fmt::Debug for PciInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciInterrupt")
            .field("gsi", &self.gsi)
            .finish_non_exhaustive()
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciInterrupt {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        relock(&self.msix)
    }

    fn vectors(&self) -> MutexGuard<'_, Vectors> {
        relock(&self.vectors)
    }

    fn set_intx(&self, level: bool) {
        if self.intx_asserted.swap(level, Ordering::AcqRel) == level {
            return;
        }
        if let Err(e) = self.irq.set_irq_line(self.gsi, level) {
            tracing::warn!(gsi = self.gsi, "virtio-pci INTx failed: {e}");
        }
    }

    /// A vector the driver may use: one of the table's, else NO_VECTOR.
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix().len() {
            v
        } else {
            NO_VECTOR
        }
    }
}

impl PciInterrupt {
    /// Raises `cause`'s vector (or INTx); with `hold`, an MSI may wait that long while
    /// the guest's vCPUs are all busy.
    fn raise_within(&self, cause: Cause, hold: devices::pci::msix::Hold) {
        let vector = {
            let v = self.vectors();
            match cause {
                Cause::Queue(i) => v.queues.get(i).copied().unwrap_or(NO_VECTOR),
                Cause::Config => v.config,
            }
        };
        let mut msix = self.msix();
        if msix.enabled() {
            // With MSI-X on, a cause without a vector interrupts nothing (4.1.5.1.3.1).
            if vector != NO_VECTOR {
                msix.trigger_as(vector, hold);
            }
            return;
        }
        drop(msix);
        if !self.intx_disabled.load(Ordering::Acquire) {
            self.set_intx(true);
        }
    }
}

impl Interrupt for PciInterrupt {
    fn raise(&self, cause: Cause) {
        self.raise_within(cause, Hold::Now);
    }

    fn raise_held(&self, cause: Cause) {
        self.raise_within(cause, Hold::WhileBusy(QUEUE_INTERRUPT_HOLD));
    }

    fn raise_at_halt(&self, cause: Cause) {
        self.raise_within(cause, Hold::UntilHalt(QUEUE_INTERRUPT_HOLD));
    }

    fn moderated(&self) -> bool {
        self.irq.moderates()
    }

    fn release_held(&self) {
        self.irq.release_moderated();
    }

    fn reset(&self) {
        let mut v = self.vectors();
        v.config = NO_VECTOR;
        v.queues.fill(NO_VECTOR);
        drop(v);
        self.set_intx(false);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    #[error("building the configuration space: {0}")]
    Config(#[from] config::ConfigError),
}

/// A virtio device as a PCI function.
pub struct PciTransport {
    config: PciConfig,
    core: Arc<DeviceCore>,
    doorbell: Doorbell,
    interrupt: Arc<PciInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u16,
    /// Where the MSI-X capability and the PCI configuration access capability sit.
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// Told where BAR 0 decodes whenever that changes (see
    /// [`PciTransport::notify_through_ioevents`]).
    bar_moved: Option<BarMoved>,
}

/// Called with BAR 0's old and new base (None: not decoding) when the guest moves it,
/// or enables or disables its decoding.
pub type BarMoved = Box<dyn FnMut(Option<u64>, Option<u64>) + Send>;

/// The address of queue `queue`'s notification register when BAR 0 is at `bar_base`.
pub fn notify_address(bar_base: u64, queue: u32) -> u64 {
    bar_base
        .wrapping_add(NOTIFY)
        .wrapping_add(u64::from(queue) * u64::from(NOTIFY_MULTIPLIER))
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("device_type", &self.core.device_type())
            .field("io_thread", &self.doorbell.has_io_thread())
            .finish_non_exhaustive()
    }
}

/// A virtio_pci_cap body (after ID and next pointer) for `cfg_type` at BAR 0.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl PciTransport {
    /// `device` as a virtio-pci function whose INTx line is `gsi`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqChip>,
        gsi: u32,
    ) -> Result<Self, PciTransportError> {
        let dtype = device.device_type();
        let nqueues = device.queue_max_sizes().len();
        let vectors = u16::try_from(nqueues + 1)
            .unwrap_or(msix::MAX_VECTORS)
            .min(msix::MAX_VECTORS);
        let interrupt = Arc::new(PciInterrupt {
            msix: Mutex::new(Msix::new(vectors, irq.clone())),
            vectors: Mutex::new(Vectors {
                config: NO_VECTOR,
                queues: vec![NO_VECTOR; nqueues],
            }),
            irq,
            gsi,
            intx_asserted: AtomicBool::new(false),
            intx_disabled: AtomicBool::new(false),
        });
        let core = Arc::new(DeviceCore::new(device, mem, Box::new(interrupt.clone())));

        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE.saturating_add(dtype as u16),
            class: class_code(dtype),
            // Modern-only devices report revision 1 or more (4.1.2.1).
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: SUBSYSTEM_ID,
        });
        config.add_bar(0, BarKind::Mem32, BAR_SIZE)?;
        config.set_interrupt_pin(1);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CAP_COMMON_CFG, COMMON, COMMON_LEN, &[]),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CAP_NOTIFY_CFG,
                NOTIFY,
                NOTIFY_LEN,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &virtio_cap(CAP_ISR_CFG, ISR, 1, &[]), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CAP_DEVICE_CFG, DEVICE, DEVICE_LEN, &[]),
            &[],
        )?;
        // The configuration access window: bar, offset, length and data are the
        // driver's to write (4.1.4.9).
        let mut w = vec![0u8; 18];
        w[2] = 0xff;
        w[6..18].fill(0xff);
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR, &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]), &w)?;
        let (body, writable) =
            interrupt
                .msix()
                .capability(0, MSIX_TABLE as u32, 0, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable)?;
        Ok(PciTransport {
            config,
            doorbell: Doorbell::new(core.clone()),
            core,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            msix_cap,
            pci_cfg_cap,
            bar_moved: None,
        })
    }

    /// Calls `f` with BAR 0's old and new base whenever where it decodes changes.
    pub fn on_bar_moved(&mut self, f: BarMoved) {
        self.bar_moved = Some(f);
    }

    /// Each queue's notify becomes an ioevent on `vm` for its doorbell (`notifiers`,
    /// from [`IoThread::queue_notifiers`]) wherever the guest places BAR 0, so a notify
    /// wakes the I/O thread without reaching the VMM's buses or this transport (with KVM,
    /// without leaving the kernel). The ioevents follow the BAR: unregistered where it
    /// was, registered where it goes. A registration the accelerator refuses leaves that
    /// queue's notifies to the BAR, which rings the same doorbell.
    pub fn notify_through_ioevents(
        &mut self,
        vm: Arc<dyn hypervisor::Vm>,
        notifiers: Vec<(u32, hypervisor::EventFd)>,
    ) {
        let mut registered: Vec<(u64, usize)> = Vec::new();
        self.on_bar_moved(Box::new(move |_old, new| {
            for (addr, i) in registered.drain(..) {
                let Some((_, fd)) = notifiers.get(i) else {
                    continue;
                };
                if let Err(e) = vm.unregister_ioevent(IoEventAddress::Mmio(addr), None, fd) {
                    tracing::warn!(addr, "virtio-pci notify ioevent: {e}");
                }
            }
            let Some(base) = new else { return };
            for (i, (queue, fd)) in notifiers.iter().enumerate() {
                let addr = notify_address(base, *queue);
                match vm.register_ioevent(IoEventAddress::Mmio(addr), None, fd) {
                    Ok(()) => registered.push((addr, i)),
                    Err(e) => tracing::warn!(addr, "virtio-pci notify ioevent: {e}"),
                }
            }
            tracing::debug!(base, ioevents = registered.len(), "virtio-pci notifies");
        }));
    }

    /// BAR 0's base while it decodes.
    fn bar_base(&self) -> Option<u64> {
        self.config.bar_mapping(0).map(|m| m.base)
    }

    /// The device side, for threads that feed it from the host.
    pub fn core(&self) -> Arc<DeviceCore> {
        self.core.clone()
    }

    /// From now on the driver's notifies only wake the returned I/O thread (see
    /// [`Doorbell::io_thread`]).
    pub fn io_thread(
        &mut self,
        name: &str,
        host_input: Option<Box<dyn HostInput>>,
    ) -> std::io::Result<IoThread> {
        self.doorbell.io_thread(name, host_input)
    }

    /// Notifies serve on the notifying vCPU what needs no waiting, before waking the I/O
    /// thread (see [`Doorbell::serve_inline`]); false when the device cannot. Call after
    /// `io_thread`, and register no ioevent for the queues it serves so then
    /// (`serves_inline`).
    pub fn serve_inline(&mut self) -> bool {
        self.doorbell.serve_inline()
    }

    /// Whether queue `queue`'s notifies are served inline (register no ioevent for it).
    pub fn serves_inline(&self, queue: u32) -> bool {
        self.doorbell.serves_inline(queue)
    }

    /// The value of the common configuration field at `start`.
    fn read_common_field(&self, start: u64) -> u64 {
        use common::*;
        let q = usize::from(self.queue_sel);
        let queue =
            |f: &dyn Fn(&virtio_queue::Queue) -> u64| self.core.read_queue(q, f).unwrap_or(0);
        match start {
            DEVICE_FEATURE_SELECT => u64::from(self.device_features_sel),
            DEVICE_FEATURE => u64::from(self.core.offered_features(self.device_features_sel)),
            DRIVER_FEATURE_SELECT => u64::from(self.driver_features_sel),
            DRIVER_FEATURE => u64::from(self.core.driver_features(self.driver_features_sel)),
            CONFIG_MSIX_VECTOR => u64::from(self.interrupt.vectors().config),
            NUM_QUEUES => self.core.num_queues() as u64,
            DEVICE_STATUS => u64::from(self.core.status() & 0xff),
            CONFIG_GENERATION => u64::from(self.core.config_generation() & 0xff),
            QUEUE_SELECT => u64::from(self.queue_sel),
            QUEUE_SIZE => queue(&|q| u64::from(q.size())),
            QUEUE_MSIX_VECTOR => u64::from(
                self.interrupt
                    .vectors()
                    .queues
                    .get(q)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            QUEUE_ENABLE => queue(&|q| u64::from(q.ready())),
            QUEUE_NOTIFY_OFF => u64::from(self.queue_sel),
            QUEUE_DESC => queue(&|q| q.desc_table()),
            QUEUE_DRIVER => queue(&|q| q.avail_ring()),
            QUEUE_DEVICE => queue(&|q| q.used_ring()),
            _ => 0,
        }
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((start, size)) = common::field(offset) else {
            return;
        };
        let shift = offset - start;
        if shift + data.len() as u64 > size {
            return;
        }
        let v = self.read_common_field(start) >> (8 * shift);
        let n = data.len();
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        use common::*;
        let Some((start, size)) = common::field(offset) else {
            return;
        };
        let shift = offset - start;
        let len = data.len() as u64;
        // Whole fields, or either 32-bit half of a 64-bit one.
        if !(shift == 0 && len == size || size == 8 && len == 4 && (shift == 0 || shift == 4)) {
            tracing::debug!(offset, len, "virtio-pci common configuration write ignored");
            return;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let q = usize::from(self.queue_sel);
        // The low and high halves of a ring address.
        let halves = |v: u64| -> (Option<u32>, Option<u32>) {
            match (shift, len) {
                (0, 8) => (Some(v as u32), Some((v >> 32) as u32)),
                (0, _) => (Some(v as u32), None),
                _ => (None, Some(v as u32)),
            }
        };
        match start {
            DEVICE_FEATURE_SELECT => self.device_features_sel = v as u32,
            DRIVER_FEATURE_SELECT => self.driver_features_sel = v as u32,
            DRIVER_FEATURE => self
                .core
                .set_driver_features(self.driver_features_sel, v as u32),
            CONFIG_MSIX_VECTOR => {
                let vector = self.interrupt.valid_vector(v as u16);
                self.interrupt.vectors().config = vector;
            }
            DEVICE_STATUS => {
                for queue in self.core.write_status(v as u32) {
                    self.doorbell.ring(queue as u32);
                }
                if v == 0 {
                    self.queue_sel = 0;
                }
            }
            QUEUE_SELECT => self.queue_sel = v as u16,
            QUEUE_SIZE => {
                self.core.setup_queue(q, |queue| {
                    queue
                        .try_set_size(v as u16)
                        .map_err(|_| format!("size {v} is not a power of two within the maximum"))
                });
            }
            QUEUE_MSIX_VECTOR => {
                let vector = self.interrupt.valid_vector(v as u16);
                if let Some(slot) = self.interrupt.vectors().queues.get_mut(q) {
                    *slot = vector;
                }
            }
            // The driver only ever enables a queue; a reset disables them all.
            QUEUE_ENABLE if v == 1 => self.core.set_queue(q, |queue| queue.set_ready(true)),
            QUEUE_DESC => {
                let (lo, hi) = halves(v);
                self.core
                    .set_queue(q, |queue| queue.set_desc_table_address(lo, hi));
            }
            QUEUE_DRIVER => {
                let (lo, hi) = halves(v);
                self.core
                    .set_queue(q, |queue| queue.set_avail_ring_address(lo, hi));
            }
            QUEUE_DEVICE => {
                let (lo, hi) = halves(v);
                self.core
                    .set_queue(q, |queue| queue.set_used_ring_address(lo, hi));
            }
            _ => tracing::debug!(offset, "virtio-pci write to a read-only field ignored"),
        }
    }

    /// The configuration access capability's window: (offset in BAR 0, length), when
    /// it selects BAR 0 with a length of 1, 2 or 4 inside it.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let mut b = [0u8; 12];
        self.config.read(self.pci_cfg_cap + 4, &mut b);
        let bar = b[0];
        let offset = u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let length = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        (bar == 0 && matches!(length, 1 | 2 | 4) && offset + length as u64 <= BAR_SIZE)
            .then_some((offset, length))
    }

    fn pci_cfg_data(&self) -> std::ops::Range<usize> {
        self.pci_cfg_cap + 16..self.pci_cfg_cap + 20
    }
}

fn overlaps(offset: usize, len: usize, r: &std::ops::Range<usize>) -> bool {
    offset < r.end && r.start < offset + len
}

impl PciDevice for PciTransport {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_data();
        if overlaps(offset, data.len(), &window) {
            // A read of pci_cfg_data reads the BAR through the window (4.1.4.9.1).
            if let Some((bar_off, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.read_bar(0, bar_off, &mut buf[..len]);
                self.config.set_bytes(window.start, &buf);
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let bar_before = self.bar_base();
        self.config.write(offset, data);
        let bar_after = self.bar_base();
        if bar_after != bar_before {
            if let Some(f) = self.bar_moved.as_mut() {
                f(bar_before, bar_after);
            }
        }
        let len = data.len();
        if overlaps(offset, len, &(config::COMMAND..config::COMMAND + 2)) {
            let disabled = self.config.command() & config::COMMAND_INTX_DISABLE != 0;
            self.interrupt
                .intx_disabled
                .store(disabled, Ordering::Release);
            if disabled {
                self.interrupt.set_intx(false);
            }
        }
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if overlaps(offset, len, &control) {
            let mut c = [0u8; 2];
            self.config.read(control.start, &mut c);
            self.interrupt.msix().set_control(u16::from_le_bytes(c));
        }
        let window = self.pci_cfg_data();
        if overlaps(offset, len, &window) {
            if let Some((bar_off, n)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(window.start, &mut buf);
                self.write_bar(0, bar_off, &buf[..n]);
            }
        }
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if index != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o - COMMON, data),
            ISR => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    // Reading clears the ISR and lowers INTx (4.1.4.5).
                    *b = self.core.take_interrupt_status() as u8;
                    self.interrupt.set_intx(false);
                }
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.core.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix().read_table(o - MSIX_TABLE, data)
            }
            o if o >= MSIX_PBA => self.interrupt.msix().read_pba(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != 0 {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o - COMMON, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.core.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                // The address says which queue; the value (the queue index without
                // NOTIFICATION_DATA) is not needed.
                self.doorbell
                    .ring(((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u32);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix().write_table(o - MSIX_TABLE, data)
            }
            _ => tracing::debug!(offset, "virtio-pci BAR write ignored"),
        }
    }
}

mod persist;
pub use persist::PciSnapshot;

#[cfg(test)]
mod tests;
