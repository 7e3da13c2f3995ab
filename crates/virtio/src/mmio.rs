//! The virtio-mmio transport, version 2 (virtio 1.x "modern"), as one device on the MMIO
//! bus. Register offsets are those of the virtio spec, 4.2.2.
//!
//! [`MmioTransport`] is what the bus maps: register selectors and the doorbell. The
//! device, its queues and its status are the shared [`DeviceCore`]; its interrupt is an
//! edge on the device's GSI ([`GsiEdge`]), through the chip or an irqfd. With an I/O
//! thread, the VMM can register each queue's doorbell as an ioevent at
//! [`QUEUE_NOTIFY_OFFSET`] so a notify never reaches the transport.

mod persist;
pub use persist::MmioSnapshot;

use std::sync::Arc;

use devices::BusDevice;
use hypervisor::IrqChip;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::transport::Doorbell;
pub use crate::transport::{
    status, DeviceCore, FdInput, GsiEdge, HostInput, IoGate, IoThread, INT_CONFIG_CHANGE,
    INT_USED_RING,
};
use crate::VirtioDevice;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
/// The doorbell's offset in the window: a VMM can register an ioevent per queue there
/// (the value written is the queue's index), see [`IoThread::queue_notifiers`].
pub const QUEUE_NOTIFY_OFFSET: u64 = QUEUE_NOTIFY;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// "VSSL": the subsystem vendor ID reported to drivers.
const VENDOR: u32 = 0x4c53_5356;

/// The transport around one device.
pub struct MmioTransport {
    core: Arc<DeviceCore>,
    interrupt: Arc<GsiEdge>,
    doorbell: Doorbell,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.core.device_type())
            .field("io_thread", &self.doorbell.has_io_thread())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqChip>,
        gsi: u32,
    ) -> Self {
        let interrupt = Arc::new(GsiEdge::new(irq, gsi));
        let core = Arc::new(DeviceCore::new(device, mem, Box::new(interrupt.clone())));
        MmioTransport {
            doorbell: Doorbell::new(core.clone()),
            core,
            interrupt,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.core.status()
    }

    /// The device side, for threads that feed it from the host.
    pub fn core(&self) -> Arc<DeviceCore> {
        self.core.clone()
    }

    /// Run the device on queue `index` on this thread.
    pub fn process_queue(&mut self, index: usize) {
        self.core.process_queue(index);
    }

    /// From now on interrupts are writes to `fd`, an eventfd the VMM registered with the
    /// accelerator as an irqfd for this device's GSI. False if one was set already.
    pub fn use_irqfd(&self, fd: hypervisor::EventFd) -> bool {
        self.interrupt.use_irqfd(fd)
    }

    /// The device's GSI.
    pub fn gsi(&self) -> u32 {
        self.interrupt.gsi()
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

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queue_sel as usize;
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.core.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => self.core.offered_features(self.device_features_sel),
            INTERRUPT_STATUS => self.core.interrupt_status(),
            QUEUE_NUM_MAX => self
                .core
                .read_queue(q, |q| u32::from(q.max_size()))
                .unwrap_or(0),
            QUEUE_READY => self
                .core
                .read_queue(q, |q| u32::from(q.ready()))
                .unwrap_or(0),
            STATUS => self.core.status(),
            CONFIG_GENERATION => self.core.config_generation(),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let q = self.queue_sel as usize;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => self.core.set_driver_features(self.driver_features_sel, v),
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NOTIFY => self.doorbell.ring(v),
            INTERRUPT_ACK => self.core.ack_interrupt(v),
            STATUS => {
                for queue in self.core.write_status(v) {
                    self.doorbell.ring(queue as u32);
                }
                if v == 0 {
                    self.queue_sel = 0;
                }
            }
            QUEUE_NUM => {
                self.core.setup_queue(q, |queue| {
                    u16::try_from(v)
                        .ok()
                        .and_then(|size| queue.try_set_size(size).ok())
                        .ok_or_else(|| format!("size {v} is not a power of two within the maximum"))
                });
            }
            QUEUE_READY => self.core.set_queue(q, |queue| queue.set_ready(v == 1)),
            QUEUE_DESC_LOW => self
                .core
                .set_queue(q, |queue| queue.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH => self
                .core
                .set_queue(q, |queue| queue.set_desc_table_address(None, Some(v))),
            QUEUE_DRIVER_LOW => self
                .core
                .set_queue(q, |queue| queue.set_avail_ring_address(Some(v), None)),
            QUEUE_DRIVER_HIGH => self
                .core
                .set_queue(q, |queue| queue.set_avail_ring_address(None, Some(v))),
            QUEUE_DEVICE_LOW => self
                .core
                .set_queue(q, |queue| queue.set_used_ring_address(Some(v), None)),
            QUEUE_DEVICE_HIGH => self
                .core
                .set_queue(q, |queue| queue.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!(offset, v, "virtio-mmio write ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.core.read_config(offset - CONFIG, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.core.write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
