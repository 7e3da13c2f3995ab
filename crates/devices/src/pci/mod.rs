//! PCI: one root bus (bus 0) behind a host bridge, reached through the legacy
//! configuration ports (0xcf8 address, 0xcfc data: "configuration mechanism #1") and
//! through ECAM (each function's 4 KiB configuration space memory-mapped, described to
//! the guest by ACPI's MCFG table).
//!
//! [`PciRoot`] holds the functions (one per device slot, function 0 only) and decodes
//! their BARs itself: the VMM's buses send it the accesses no fixed device claimed, and
//! it finds the BAR that the guest placed there (memory or I/O decoding enabled in its
//! command register). So a guest or firmware moving a BAR needs no bus re-mapping; the
//! table of windows is rebuilt after each write to a command register or BAR.
//!
//! Interrupts are the devices' business: INTx lines through `IrqChip::set_irq_line` on
//! the GSI the DSDT's `_PRT` gives their slot, MSI-X through [`msix::Msix`].

pub mod config;
pub mod msix;
pub mod q35;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use config::{BarKind, BarMapping, PciConfig, PciIds};

use crate::bus::BusDevice;

/// Configuration mechanism #1: the address register (a dword at 0xcf8; byte accesses
/// there and at 0xcf9 belong to other chipset registers) and the data window.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Address register bit 31: the next data access is a configuration cycle.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Device slots on the bus.
pub const SLOTS: usize = 32;
/// ECAM bytes per bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The host bridge's slot.
pub const HOST_BRIDGE_SLOT: usize = 0;

/// The ID the host bridge reports: the generic PCIe host bridge ID (Red Hat's vendor
/// range for virtual hardware), which firmware and Linux treat as a plain host bridge
/// with no chipset registers to program.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code of a host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// A PCI function.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// A configuration read at `offset` (1, 2 or 4 bytes inside one dword).
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write; devices with capabilities that act (MSI-X's enable bit)
    /// look at what changed.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// An access inside BAR `index`, at `offset` from its base.
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI slot {0} does not exist or is taken")]
    Slot(usize),
    #[error("the PCI bus is full ({SLOTS} slots)")]
    Full,
}

/// The host bridge: configuration space only.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfig,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: PciConfig::new(PciIds {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                class: CLASS_HOST_BRIDGE,
                revision: 0,
                // The subsystem IDs every QEMU device reports (1af4:1100): firmware
                // built for QEMU (SeaBIOS) checks them on the host bridge before it
                // trusts fw_cfg and its debug port.
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}

/// Where a BAR decodes: [base, end) of memory or port space.
#[derive(Clone, Copy, Debug)]
struct Window {
    io: bool,
    base: u64,
    end: u64,
    slot: usize,
    bar: usize,
}

type Slot = Arc<Mutex<dyn PciDevice>>;

/// Bus 0 and its functions.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    /// The configuration address register (0xcf8).
    address: AtomicU32,
    windows: RwLock<Vec<Window>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..SLOTS)
            .filter(|&s| matches!(self.slots.get(s), Some(Some(_))))
            .collect();
        f.debug_struct("PciRoot")
            .field("slots", &used)
            .finish_non_exhaustive()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(d: &Slot) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device that panicked while holding its lock is still the device.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a configuration access of `len` bytes at `offset` is one the bus carries:
/// 1, 2 or 4 bytes, naturally aligned (so inside one dword).
fn config_access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= config::CONFIG_SIZE
}

impl PciRoot {
    /// A bus with the host bridge in slot 0.
    ///
    /// ```
    /// use devices::pci::PciRoot;
    /// let root = PciRoot::new();
    /// let mut id = [0u8; 4];
    /// root.config_read(0, 0, 0, 0, &mut id);
    /// assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
    /// ```
    pub fn new() -> Self {
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[HOST_BRIDGE_SLOT] = Some(Arc::new(Mutex::new(HostBridge::default())));
        PciRoot {
            slots,
            address: AtomicU32::new(0),
            windows: RwLock::new(Vec::new()),
        }
    }

    /// Put `device` in `slot`.
    /// Bus 0 with `bridge` as its host bridge (a chipset's, which firmware programs)
    /// instead of the generic one.
    pub fn with_host_bridge(bridge: Slot) -> Self {
        let mut root = Self::new();
        root.slots[HOST_BRIDGE_SLOT] = Some(bridge);
        root
    }

    pub fn add(&mut self, slot: usize, device: Slot) -> Result<(), PciError> {
        match self.slots.get_mut(slot) {
            Some(s @ None) => {
                *s = Some(device);
                self.rebuild_windows();
                Ok(())
            }
            _ => Err(PciError::Slot(slot)),
        }
    }

    /// The configuration address register (0xcf8), for a snapshot: a vCPU may stop
    /// between selecting a register and reaching it through 0xcfc.
    pub fn address(&self) -> u32 {
        self.address.load(Ordering::Acquire)
    }

    /// Puts a snapshot's configuration address register back.
    pub fn set_address(&self, value: u32) {
        self.address.store(value, Ordering::Release);
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Result<usize, PciError> {
        self.slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::Full)
    }

    fn function(&self, bus: u8, slot: usize, function: usize) -> Option<&Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(slot)?.as_ref()
    }

    /// A configuration read; all ones where there is no function.
    pub fn config_read(
        &self,
        bus: u8,
        slot: usize,
        function: usize,
        offset: usize,
        data: &mut [u8],
    ) {
        match self.function(bus, slot, function) {
            Some(d) if config_access_ok(offset, data.len()) => lock(d).read_config(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; dropped where there is no function.
    pub fn config_write(&self, bus: u8, slot: usize, function: usize, offset: usize, data: &[u8]) {
        let Some(d) = self.function(bus, slot, function) else {
            return;
        };
        if !config_access_ok(offset, data.len()) {
            return;
        }
        lock(d).write_config(offset, data);
        let end = offset + data.len();
        let touches = |a: usize, b: usize| offset < b && a < end;
        if touches(config::COMMAND, config::COMMAND + 2)
            || touches(config::BAR0, config::BAR0 + 4 * config::BAR_COUNT)
        {
            self.rebuild_windows();
        }
    }

    fn rebuild_windows(&self) {
        let mut windows = Vec::new();
        for (slot, d) in self.slots.iter().enumerate() {
            let Some(d) = d else { continue };
            let d = lock(d);
            for bar in 0..config::BAR_COUNT {
                if let Some(m) = d.config().bar_mapping(bar) {
                    windows.push(Window {
                        io: m.kind == BarKind::Io,
                        base: m.base,
                        end: m.base + m.size,
                        slot,
                        bar,
                    });
                }
            }
        }
        *self.windows.write().unwrap_or_else(|p| p.into_inner()) = windows;
    }

    /// Where BARs decode now: (slot, BAR, mapping) for every enabled BAR.
    pub fn mappings(&self) -> Vec<(usize, BarMapping)> {
        let mut out = Vec::new();
        for (slot, d) in self.slots.iter().enumerate() {
            let Some(d) = d else { continue };
            let d = lock(d);
            out.extend(
                (0..config::BAR_COUNT).filter_map(|b| Some((slot, d.config().bar_mapping(b)?))),
            );
        }
        out
    }

    fn find(&self, io: bool, addr: u64, len: usize) -> Option<(Slot, usize, u64)> {
        let windows = self.windows.read().unwrap_or_else(|p| p.into_inner());
        let w = windows.iter().find(|w| {
            w.io == io && addr >= w.base && addr.checked_add(len as u64).is_some_and(|e| e <= w.end)
        })?;
        let d = self.slots.get(w.slot)?.clone()?;
        Some((d, w.bar, addr - w.base))
    }

    /// A memory read no fixed device claimed: true if a BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.bar_read(false, addr, data)
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.bar_write(false, addr, data)
    }

    /// A port read no fixed device claimed: true if an I/O BAR decodes it.
    pub fn pio_read(&self, port: u64, data: &mut [u8]) -> bool {
        self.bar_read(true, port, data)
    }

    pub fn pio_write(&self, port: u64, data: &[u8]) -> bool {
        self.bar_write(true, port, data)
    }

    fn bar_read(&self, io: bool, addr: u64, data: &mut [u8]) -> bool {
        match self.find(io, addr, data.len()) {
            Some((d, bar, offset)) => {
                lock(&d).read_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }

    fn bar_write(&self, io: bool, addr: u64, data: &[u8]) -> bool {
        match self.find(io, addr, data.len()) {
            Some((d, bar, offset)) => {
                lock(&d).write_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// The function and offset the configuration address register selects, if enabled.
    fn selected(&self, data_offset: u64) -> Option<(u8, usize, usize, usize)> {
        let a = self.address.load(Ordering::Acquire);
        if a & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (a >> 16) as u8;
        let slot = ((a >> 11) & 0x1f) as usize;
        let function = ((a >> 8) & 0x7) as usize;
        let offset = (a & 0xfc) as usize + (data_offset & 3) as usize;
        Some((bus, slot, function, offset))
    }
}

/// The configuration address register at 0xcf8, as a port-bus device (one port wide,
/// so the reset control register at 0xcf9 stays separate; dword accesses only).
#[derive(Debug)]
pub struct ConfigAddress(pub Arc<PciRoot>);

impl BusDevice for ConfigAddress {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.0.address.load(Ordering::Acquire).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Ok(b)) = (offset, <[u8; 4]>::try_from(data)) {
            // Bits 1:0 are reserved and read as zero.
            self.0
                .address
                .store(u32::from_le_bytes(b) & !0x7f00_0003, Ordering::Release);
        }
    }
}

/// The configuration data window at 0xcfc..0xd00.
#[derive(Debug)]
pub struct ConfigData(pub Arc<PciRoot>);

impl BusDevice for ConfigData {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.0.selected(offset) {
            Some((bus, slot, f, off)) => self.0.config_read(bus, slot, f, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, slot, f, off)) = self.0.selected(offset) {
            self.0.config_write(bus, slot, f, off, data);
        }
    }
}

/// ECAM: bus 0's configuration spaces in memory (the MCFG table says where).
#[derive(Debug)]
pub struct Ecam(pub Arc<PciRoot>);

impl Ecam {
    fn decode(offset: u64) -> (u8, usize, usize, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, f, off) = Self::decode(offset);
        self.0.config_read(bus, slot, f, off, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, f, off) = Self::decode(offset);
        self.0.config_write(bus, slot, f, off, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with one 4 KiB memory BAR and one 32-byte I/O BAR that remembers
    /// the last BAR access.
    struct Probe {
        config: PciConfig,
        last: Option<(usize, u64, Vec<u8>)>,
    }

    impl Probe {
        fn new() -> Self {
            let mut config = PciConfig::new(PciIds {
                vendor: 0x1af4,
                device: 0x1041,
                class: 0x02_00_00,
                revision: 1,
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            });
            config.add_bar(0, BarKind::Mem32, 0x1000).unwrap();
            config.add_bar(1, BarKind::Io, 0x20).unwrap();
            Probe { config, last: None }
        }
    }

    impl PciDevice for Probe {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            data.fill(index as u8 + 0x10);
            self.last = Some((index, offset, vec![]));
        }
        fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
            self.last = Some((index, offset, data.to_vec()));
        }
    }

    fn cf8(root: &Arc<PciRoot>, slot: u32, reg: u32) {
        ConfigAddress(root.clone()).write(0, &(CONFIG_ENABLE | (slot << 11) | reg).to_le_bytes());
    }

    fn cfc_read(root: &Arc<PciRoot>, offset: u64, len: usize) -> u32 {
        let mut d = vec![0u8; len];
        ConfigData(root.clone()).read(offset, &mut d);
        d.resize(4, 0);
        u32::from_le_bytes(d.try_into().unwrap())
    }

    #[test]
    fn the_legacy_ports_reach_the_host_bridge_and_nothing_where_no_device_is() {
        let root = Arc::new(PciRoot::new());
        cf8(&root, 0, 0);
        assert_eq!(cfc_read(&root, 0, 4), 0x0008_1b36);
        assert_eq!(cfc_read(&root, 2, 2), 0x0008);
        cf8(&root, 0, 8);
        assert_eq!(cfc_read(&root, 0, 4) >> 8, CLASS_HOST_BRIDGE);
        cf8(&root, 3, 0);
        assert_eq!(cfc_read(&root, 0, 4), u32::MAX);
        // Bus 1, function 1: nothing.
        ConfigAddress(root.clone()).write(0, &(CONFIG_ENABLE | (1 << 16)).to_le_bytes());
        assert_eq!(cfc_read(&root, 0, 4), u32::MAX);
        ConfigAddress(root.clone()).write(0, &(CONFIG_ENABLE | (1 << 8)).to_le_bytes());
        assert_eq!(cfc_read(&root, 0, 4), u32::MAX);
        // Disabled: all ones; the address register reads back without bits 1:0.
        ConfigAddress(root.clone()).write(0, &0x0000_0007u32.to_le_bytes());
        assert_eq!(cfc_read(&root, 0, 4), u32::MAX);
        let mut a = [0u8; 4];
        ConfigAddress(root.clone()).read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 4);
        // Misaligned data accesses are dropped.
        cf8(&root, 0, 0);
        assert_eq!(cfc_read(&root, 1, 2), 0xffff);
        assert_eq!(cfc_read(&root, 1, 4), u32::MAX);
    }

    #[test]
    fn bars_decode_where_the_guest_puts_them_through_ecam() {
        let mut root = PciRoot::new();
        let probe = Arc::new(Mutex::new(Probe::new()));
        let slot = root.free_slot().unwrap();
        assert_eq!(slot, 1);
        root.add(slot, probe.clone()).unwrap();
        assert_eq!(root.add(slot, probe.clone()), Err(PciError::Slot(1)));
        assert_eq!(root.add(99, probe.clone()), Err(PciError::Slot(99)));
        let root = Arc::new(root);
        let mut ecam = Ecam(root.clone());
        let fn_base = (slot as u64) << 15;
        let mut d = [0u8; 4];
        ecam.read(fn_base, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        // Sizing, then placement.
        ecam.write(fn_base + 0x10, &u32::MAX.to_le_bytes());
        ecam.read(fn_base + 0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
        ecam.write(fn_base + 0x10, &0xc000_1000u32.to_le_bytes());
        ecam.write(fn_base + 0x14, &0xc040u32.to_le_bytes());
        let mut b = [0u8; 4];
        assert!(
            !root.mmio_read(0xc000_1004, &mut b),
            "memory decoding is off"
        );
        ecam.write(fn_base + 0x04, &3u16.to_le_bytes());
        assert!(root.mmio_read(0xc000_1ffc, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(root.mmio_write(0xc000_1008, &[1, 2]));
        assert_eq!(probe.lock().unwrap().last, Some((0, 8, vec![1, 2])));
        assert!(!root.mmio_read(0xc000_1ffe, &mut b), "runs past the BAR");
        assert!(!root.mmio_read(0xc000_2000, &mut b));
        assert!(root.pio_write(0xc05f, &[9]));
        assert_eq!(probe.lock().unwrap().last, Some((1, 0x1f, vec![9])));
        assert_eq!(root.mappings().len(), 2);
        // Moving the BAR moves the decoding.
        ecam.write(fn_base + 0x10, &0xc100_0000u32.to_le_bytes());
        assert!(!root.mmio_read(0xc000_1000, &mut b));
        assert!(root.mmio_read(0xc100_0000, &mut b));
        // Other buses and functions read all ones through ECAM too.
        ecam.read(ECAM_BUS_SIZE + fn_base, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(fn_base + (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(fn_base + 0xffe, &mut d);
        assert_eq!(d, [0xff; 4], "a dword access crossing the end");
    }
}
