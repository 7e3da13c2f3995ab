//! virtio-pci driven as Linux's virtio_pci_modern drives it: find the capabilities in
//! configuration space, place BAR 0, negotiate, set a queue up with an MSI-X vector,
//! and see the request complete with the right message (or INTx without MSI-X).

use std::sync::{Arc, Mutex};

use devices::pci::PciDevice;
use hypervisor::IrqChip;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::blk::Block;
use crate::fuzzing::MemDisk;
use crate::rng::Rng;
use crate::transport::status;
use crate::VIRTIO_F_VERSION_1;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x10000;
const QSIZE: u16 = 16;
const MSI_ADDR: u64 = 0xfee0_0000;

#[derive(Default)]
struct Chip {
    msis: Mutex<Vec<(u64, u32)>>,
    lines: Mutex<Vec<(u32, bool)>>,
}

impl IrqChip for Chip {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        self.lines.lock().unwrap().push((gsi, active));
        Ok(())
    }
    fn signal_msi(&self, address: u64, data: u32) -> hypervisor::Result<()> {
        self.msis.lock().unwrap().push((address, data));
        Ok(())
    }
}

struct Driver {
    t: PciTransport,
    mem: GuestMemoryMmap,
    chip: Arc<Chip>,
    /// BAR 0 offsets of the common, notify, ISR and device regions.
    common: u64,
    notify: u64,
    isr: u64,
    device: u64,
}

fn cfg_u32(t: &mut PciTransport, off: usize) -> u32 {
    let mut b = [0u8; 4];
    t.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    fn new(dev: Box<dyn VirtioDevice>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let chip = Arc::new(Chip::default());
        let mut t = PciTransport::new(dev, mem.clone(), chip.clone(), 17).unwrap();
        // Walk the capability list the way the driver does.
        let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
        let mut at = (cfg_u32(&mut t, 0x34) & 0xff) as usize;
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            assert!(seen < 16, "capability list loops");
            let head = cfg_u32(&mut t, at);
            if head & 0xff == 0x09 {
                let cfg_type = (head >> 24) as u8;
                assert_eq!(cfg_u32(&mut t, at + 4) & 0xff, 0, "BAR 0");
                let offset = u64::from(cfg_u32(&mut t, at + 8));
                match cfg_type {
                    CAP_COMMON_CFG => common = Some(offset),
                    CAP_NOTIFY_CFG => {
                        assert_eq!(cfg_u32(&mut t, at + 16), NOTIFY_MULTIPLIER);
                        notify = Some(offset)
                    }
                    CAP_ISR_CFG => isr = Some(offset),
                    CAP_DEVICE_CFG => device = Some(offset),
                    _ => {}
                }
            }
            at = ((head >> 8) & 0xff) as usize;
        }
        Driver {
            t,
            mem,
            chip,
            common: common.unwrap(),
            notify: notify.unwrap(),
            isr: isr.unwrap(),
            device: device.unwrap(),
        }
    }

    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.t.write_bar(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn set_status(&mut self, s: u32) {
        self.w(self.common + common::DEVICE_STATUS, u64::from(s), 1);
    }

    /// Initialization (3.1.1) with queue 0 on MSI-X vector `vector` if given.
    fn init(&mut self, vector: Option<u16>) {
        let c = self.common;
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w(c + common::DEVICE_FEATURE_SELECT, 1, 4);
        let hi = self.r(c + common::DEVICE_FEATURE, 4);
        assert_eq!(hi << 32 & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        self.w(c + common::DRIVER_FEATURE_SELECT, 1, 4);
        self.w(c + common::DRIVER_FEATURE, 1, 4);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(
            self.r(c + common::DEVICE_STATUS, 1) as u32 & status::FEATURES_OK,
            0
        );
        if let Some(v) = vector {
            self.w(c + common::CONFIG_MSIX_VECTOR, 0, 2);
            assert_eq!(self.r(c + common::CONFIG_MSIX_VECTOR, 2), 0);
            // Table entry `v`: address, data, unmasked.
            self.w(MSIX_TABLE + 16 * u64::from(v), MSI_ADDR, 8);
            self.w(MSIX_TABLE + 16 * u64::from(v) + 8, 0x4000 | 0x31, 4);
            self.w(MSIX_TABLE + 16 * u64::from(v) + 12, 0, 4);
            // Enable MSI-X in the capability.
            let cap = self.t.msix_cap;
            self.t.write_config(cap + 2, &0x8000u16.to_le_bytes());
        }
        self.w(c + common::QUEUE_SELECT, 0, 2);
        assert_ne!(self.r(c + common::QUEUE_SIZE, 2), 0);
        self.w(c + common::QUEUE_SIZE, u64::from(QSIZE), 2);
        if let Some(v) = vector {
            self.w(c + common::QUEUE_MSIX_VECTOR, u64::from(v), 2);
            assert_eq!(self.r(c + common::QUEUE_MSIX_VECTOR, 2), u64::from(v));
        }
        // Ring addresses as two halves (as Linux writes them) and as one quadword.
        self.w(c + common::QUEUE_DESC, DESC, 4);
        self.w(c + common::QUEUE_DESC + 4, 0, 4);
        self.w(c + common::QUEUE_DRIVER, AVAIL, 8);
        self.w(c + common::QUEUE_DEVICE, USED, 8);
        assert_eq!(self.r(c + common::QUEUE_DESC, 8), DESC);
        self.w(c + common::QUEUE_ENABLE, 1, 2);
        assert_eq!(self.r(c + common::QUEUE_ENABLE, 2), 1);
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// One device-writable buffer of `len` bytes on queue 0, and the notify.
    fn post(&mut self, len: u32) {
        self.mem.write_obj(BUF, GuestAddress(DESC)).unwrap();
        self.mem.write_obj(len, GuestAddress(DESC + 8)).unwrap();
        self.mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        self.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let off = self.r(self.common + common::QUEUE_NOTIFY_OFF, 2);
        self.w(self.notify + off * u64::from(NOTIFY_MULTIPLIER), 0, 2);
    }

    /// The used length of the first used entry, once there is one.
    fn used(&self) -> Option<u32> {
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (used == 1).then(|| self.mem.read_obj(GuestAddress(USED + 8)).unwrap())
    }

    /// [`Driver::post`] served on this thread: the used length.
    fn submit(&mut self, len: u32) -> Option<u32> {
        self.post(len);
        self.used()
    }
}

#[test]
fn the_function_identifies_as_a_modern_virtio_device_with_its_capabilities() {
    let mut d = Driver::new(Box::new(Rng));
    assert_eq!(
        cfg_u32(&mut d.t, 0),
        0x1044_1af4,
        "virtio-rng is 0x1040 + 4"
    );
    assert_eq!(cfg_u32(&mut d.t, 8) & 0xff, 1, "revision 1: modern only");
    assert_eq!(cfg_u32(&mut d.t, 0x3c) >> 8 & 0xff, 1, "INTA#");
    assert_eq!(
        (d.common, d.isr, d.device, d.notify),
        (COMMON, ISR, DEVICE, NOTIFY)
    );
    // BAR 0 sizes to BAR_SIZE.
    d.t.write_config(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(cfg_u32(&mut d.t, 0x10), !(BAR_SIZE as u32 - 1));
    // One MSI-X vector per queue and one for configuration changes.
    let cap = d.t.msix_cap;
    let msix = cfg_u32(&mut d.t, cap);
    assert_eq!(msix & 0xff, 0x11);
    assert_eq!((msix >> 16) & 0x7ff, 1, "table size 2 (encoded N - 1)");
    let blk = Driver::new(Box::new(Block::new(
        Box::new(MemDisk {
            data: vec![0; 4096],
            ro: false,
        }),
        "s",
        false,
    )));
    let mut t = blk.t;
    assert_eq!(cfg_u32(&mut t, 0), 0x1042_1af4);
    assert_eq!(cfg_u32(&mut t, 8) >> 8, 0x01_00_00, "mass storage");
    // The block device's config space: capacity 8 sectors.
    let mut cap = [0u8; 8];
    t.read_bar(0, DEVICE, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
}

#[test]
fn a_request_completes_with_an_msix_message_on_the_queues_vector() {
    let mut d = Driver::new(Box::new(Rng));
    d.init(Some(1));
    assert_eq!(d.r(COMMON + common::NUM_QUEUES, 2), 1);
    assert_eq!(d.submit(64), Some(64));
    assert_eq!(*d.chip.msis.lock().unwrap(), vec![(MSI_ADDR, 0x4031)]);
    assert!(
        d.chip.lines.lock().unwrap().is_empty(),
        "no INTx with MSI-X"
    );
    // A masked vector holds the message in the PBA.
    d.w(MSIX_TABLE + 16 + 12, 1, 4);
    d.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    d.set_status(0);
    assert_eq!(d.r(COMMON + common::DEVICE_STATUS, 1), 0);
    assert_eq!(
        d.r(COMMON + common::QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR),
        "a reset forgets the vectors"
    );
}

#[test]
fn with_an_io_thread_the_notify_region_rings_its_doorbell() {
    // The same I/O thread as virtio-mmio's: a write to the queue's notify address
    // writes the queue's eventfd, and the thread serves the queue and sends the MSI-X
    // message.
    let mut d = Driver::new(Box::new(Rng));
    d.init(Some(1));
    let io = d.t.io_thread("rng-pci", None).unwrap();
    assert_eq!(io.queue_notifiers().count(), 1, "one doorbell per queue");
    let exit = Arc::new(devices::ExitSignal::new());
    let thread = io
        .spawn(exit.clone(), Arc::new(crate::transport::IoGate::default()))
        .unwrap();
    d.post(64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.used().is_none() {
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.used(), Some(64));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.chip.msis.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no MSI-X message");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(*d.chip.msis.lock().unwrap(), vec![(MSI_ADDR, 0x4031)]);
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

#[test]
fn without_msix_intx_stays_up_until_the_isr_is_read() {
    let mut d = Driver::new(Box::new(Rng));
    d.init(None);
    assert_eq!(d.submit(32), Some(32));
    assert_eq!(*d.chip.lines.lock().unwrap(), vec![(17, true)]);
    assert_eq!(d.r(ISR, 1), 1, "used-ring interrupt");
    assert_eq!(*d.chip.lines.lock().unwrap(), vec![(17, true), (17, false)]);
    assert_eq!(d.r(ISR, 1), 0, "reading cleared it");
    assert!(d.chip.msis.lock().unwrap().is_empty());
}

#[test]
fn the_pci_configuration_access_window_reaches_bar_0() {
    let mut d = Driver::new(Box::new(Rng));
    let cap = d.t.pci_cfg_cap;
    // bar 0, offset of num_queues, length 2.
    d.t.write_config(cap + 4, &[0]);
    d.t.write_config(
        cap + 8,
        &((COMMON + common::NUM_QUEUES) as u32).to_le_bytes(),
    );
    d.t.write_config(cap + 12, &2u32.to_le_bytes());
    assert_eq!(cfg_u32(&mut d.t, cap + 16) & 0xffff, 1);
    // A write through it: the device status.
    d.t.write_config(
        cap + 8,
        &((COMMON + common::DEVICE_STATUS) as u32).to_le_bytes(),
    );
    d.t.write_config(cap + 12, &1u32.to_le_bytes());
    d.t.write_config(cap + 16, &[status::ACKNOWLEDGE as u8, 0, 0, 0]);
    assert_eq!(d.t.core.status(), status::ACKNOWLEDGE);
    // A window past the BAR does nothing.
    d.t.write_config(cap + 8, &(BAR_SIZE as u32).to_le_bytes());
    d.t.write_config(cap + 16, &[0xff; 4]);
    assert_eq!(d.t.core.status(), status::ACKNOWLEDGE);
}

#[test]
fn hostile_accesses_anywhere_do_not_panic() {
    let mut d = Driver::new(Box::new(Rng));
    d.init(Some(0));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 3, 4, 8][(x % 5) as usize];
        let off = (x >> 8) % (BAR_SIZE + 64);
        let v = x.rotate_left(17).to_le_bytes();
        match (x >> 40) % 4 {
            0 => d.t.write_bar(0, off, &v[..len]),
            1 => {
                let mut b = [0u8; 8];
                d.t.read_bar(0, off, &mut b[..len]);
            }
            2 => d.t.write_config((off % 4200) as usize, &v[..len]),
            _ => {
                let mut b = [0u8; 8];
                d.t.read_config((off % 4200) as usize, &mut b[..len]);
            }
        }
    }
    d.t.read_bar(3, 0, &mut [0u8; 4]);
    d.t.write_bar(3, u64::MAX, &[0u8; 4]);
    d.t.read_bar(0, u64::MAX, &mut [0u8; 4]);
}
