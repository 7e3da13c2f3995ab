//! The virtio-mmio transport, version 2 (virtio 1.x "modern"), as one device on the MMIO
//! bus. Register offsets are those of the virtio spec, 4.2.2.

use std::sync::Arc;

use devices::BusDevice;
use hypervisor::IrqChip;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::{VirtioDevice, VIRTIO_F_VERSION_1};

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

/// The transport around one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn IrqChip>,
    gsi: u32,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
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
        let queues = device
            .queue_max_sizes()
            .iter()
            // A max size that is zero or not a power of two is a device bug: clamp to 256.
            .map(|&s| Queue::new(s).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            gsi,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.pulse_irq_line(self.gsi) {
            tracing::warn!(gsi = self.gsi, "virtio interrupt failed: {e}");
        }
    }

    /// Enter DEVICE_NEEDS_RESET and tell the driver: the guest handed us something no
    /// correct driver would.
    fn fail(&mut self, why: impl std::fmt::Display) {
        tracing::warn!(
            device_type = self.device.device_type(),
            "virtio device needs reset: {why}"
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt(INT_CONFIG_CHANGE);
    }

    /// Run the device on queue `index` (the driver's notify, or a backend's readiness).
    pub fn process_queue(&mut self, index: usize) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if !queue.is_valid(&self.mem) {
            self.fail(format_args!(
                "queue {index} is not valid (size or ring addresses)"
            ));
            return;
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(outcome) => {
                if outcome.used {
                    let notify = queue.needs_notification(&self.mem).unwrap_or(true);
                    if notify {
                        self.interrupt(INT_USED_RING);
                    }
                }
                if let Some(next) = outcome.also_process.filter(|&n| n != index) {
                    self.process_queue(next);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted something we never offered, or a legacy interface:
                // leave FEATURES_OK clear so it sees the refusal.
                self.status = v & !status::FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        // NEEDS_RESET is the device's to set and only a reset clears it.
        self.status = v | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            QUEUE_READY => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue set-up is only legal before DRIVER_OK; drivers that do it later are buggy
        // and get ignored rather than a half-configured queue.
        let setup_ok = self.status & status::DRIVER_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM if setup_ok => {
                let index = self.queue_sel;
                let bad = match self.selected_queue() {
                    Some(q) => u16::try_from(v)
                        .map_err(|_| ())
                        .and_then(|size| q.try_set_size(size).map_err(|_| ()))
                        .is_err(),
                    None => false,
                };
                if bad {
                    self.fail(format_args!(
                        "queue {index} size {v} is not a power of two within the maximum"
                    ));
                }
            }
            QUEUE_READY if setup_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_DESC_LOW if setup_ok => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            QUEUE_DESC_HIGH if setup_ok => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            QUEUE_DRIVER_LOW if setup_ok => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            QUEUE_DRIVER_HIGH if setup_ok => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            QUEUE_DEVICE_LOW if setup_ok => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            QUEUE_DEVICE_HIGH if setup_ok => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            QUEUE_NOTIFY => self.process_queue(v as usize),
            INTERRUPT_ACK => self.interrupt_status &= !v,
            STATUS => self.write_status(v),
            _ => tracing::debug!(offset, v, "virtio-mmio write ignored"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
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
            self.device.write_config(offset - CONFIG, data);
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
