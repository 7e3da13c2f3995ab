//! A PCI function's configuration space (type 0 header): the bytes, which of them the
//! guest may write, the BARs and the capability list.
//!
//! Writes go through a per-byte mask, so read-only fields stay what the device set and
//! BAR sizing falls out of the mask: a BAR of size S keeps only the address bits above
//! S, and writing all ones reads back `!(S - 1)` with the type bits (PCI Local Bus 3.0,
//! 6.2.5.1).

/// Bytes in a PCI Express function's configuration space (ECAM); the legacy 0xcf8/0xcfc
/// mechanism reaches the first 256.
pub const CONFIG_SIZE: usize = 4096;
/// The capability list lives in the first 256 bytes, after the header.
const CAP_START: usize = 0x40;
const CAP_END: usize = 0x100;

/// Header offsets (PCI Local Bus 3.0, 6.1).
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_CODE: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status bit 4: the capabilities pointer is valid.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// BAR low bits (6.2.5.1).
const BAR_IO: u32 = 1;
const BAR_MEM_64: u32 = 0b100;
const BAR_MEM_PREFETCH: u32 = 0b1000;

/// How many BARs a type 0 header has.
pub const BAR_COUNT: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports (at most 256 bytes by convention; 64 KiB of port space in all).
    Io,
    /// Memory below 4 GiB.
    Mem32,
    /// Memory anywhere; takes this BAR and the next.
    Mem64 { prefetchable: bool },
}

/// A BAR the device declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub kind: BarKind,
    pub size: u64,
}

/// A BAR as the guest has programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    pub index: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

/// The identity a function reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass and programming interface: `0x060000` is a host bridge.
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is taken")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 (memory) or 4 (I/O)")]
    BarSize(u64),
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooLarge(usize),
}

/// One function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    bytes: Box<[u8; CONFIG_SIZE]>,
    writable: Box<[u8; CONFIG_SIZE]>,
    bars: [Option<Bar>; BAR_COUNT],
    /// Where the next capability goes, and the last one's next pointer.
    next_cap: usize,
    last_cap_next: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.u16_at(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.u16_at(DEVICE_ID)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfig {
    /// A type 0 header with `ids`, no BARs, no interrupt pin, no capabilities.
    ///
    /// ```
    /// use devices::pci::config::{PciConfig, PciIds};
    /// let ids = PciIds { vendor: 0x1af4, device: 0x1042, class: 0x010000, revision: 1,
    ///                    subsystem_vendor: 0x1af4, subsystem: 0x40 };
    /// let c = PciConfig::new(ids);
    /// assert_eq!(c.read_u32(0), 0x1042_1af4);
    /// ```
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            bytes: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            bars: [None; BAR_COUNT],
            next_cap: CAP_START,
            last_cap_next: None,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.bytes[REVISION_ID] = ids.revision;
        c.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        let command = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.writable[CACHE_LINE_SIZE] = 0xff;
        c.writable[LATENCY_TIMER] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_le_bytes(b)
    }

    /// The interrupt pin the function uses (1 = INTA#), 0 for none.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// Declare BAR `index`: `size` bytes of `kind`. A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), ConfigError> {
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let last = index + usize::from(wide);
        if last >= BAR_COUNT || self.bars[index..=last].iter().any(Option::is_some) {
            return Err(ConfigError::BarIndex(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = match kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 { .. } => 1 << 63,
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(ConfigError::BarSize(size));
        }
        let (low_bits, low_mask) = match kind {
            BarKind::Io => (BAR_IO, !(size as u32 - 1) & !0x3),
            BarKind::Mem32 => (0, !((size - 1) as u32) & !0xf),
            BarKind::Mem64 { prefetchable } => (
                BAR_MEM_64 | if prefetchable { BAR_MEM_PREFETCH } else { 0 },
                !((size - 1) as u32) & !0xf,
            ),
        };
        let off = BAR0 + 4 * index;
        self.bytes[off..off + 4].copy_from_slice(&low_bits.to_le_bytes());
        self.writable[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
        if wide {
            let high_mask = !((size - 1) >> 32) as u32;
            self.writable[off + 4..off + 8].copy_from_slice(&high_mask.to_le_bytes());
        }
        self.bars[index] = Some(Bar { kind, size });
        Ok(())
    }

    /// Append a capability: `id`, then `body` (the bytes after the ID and next pointer),
    /// with `writable` giving the guest-writable bits of `body` (shorter means the rest is
    /// read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        // Capabilities are dword-aligned.
        let at = self.next_cap;
        if at + len > CAP_END {
            return Err(ConfigError::CapabilityTooLarge(len));
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        let n = writable.len().min(body.len());
        self.writable[at + 2..at + 2 + n].copy_from_slice(&writable[..n]);
        match self.last_cap_next {
            Some(p) => self.bytes[p] = at as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = at as u8;
                let status = self.u16_at(STATUS) | STATUS_CAP_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_cap_next = Some(at + 1);
        self.next_cap = (at + len).next_multiple_of(4);
        Ok(at)
    }

    /// The dword at byte offset `reg * 4`; all ones past the end.
    pub fn read_u32(&self, reg: usize) -> u32 {
        match reg.checked_mul(4) {
            Some(off) if off + 4 <= CONFIG_SIZE => self.u32_at(off),
            _ => u32::MAX,
        }
    }

    /// Bytes at `offset` (the caller checked it is inside the space).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// A guest write: only the writable bits of each byte change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= CONFIG_SIZE) else {
            return;
        };
        for (i, &v) in (offset..end).zip(data) {
            let m = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !m) | (v & m);
        }
    }

    /// Let the guest write these bits of the bytes at `offset` (chipset registers a
    /// function keeps for firmware, beyond the standard header).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self
            .writable
            .get_mut(offset..offset.saturating_add(mask.len()))
        {
            dst.copy_from_slice(mask);
        }
    }

    /// Device-side write of bytes the guest sees (a capability's read-only fields).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self
            .bytes
            .get_mut(offset..offset.saturating_add(data.len()))
        {
            dst.copy_from_slice(data);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// The declared BARs.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Where BAR `index` currently decodes, if it is declared, its space is enabled in
    /// the command register and the guest gave it an address other than zero.
    pub fn bar_mapping(&self, index: usize) -> Option<BarMapping> {
        let bar = self.bar(index)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(off));
        let (enabled, base) = match bar.kind {
            BarKind::Io => (self.command() & COMMAND_IO != 0, low & !0x3),
            BarKind::Mem32 => (self.command() & COMMAND_MEMORY != 0, low & !0xf),
            BarKind::Mem64 { .. } => (
                self.command() & COMMAND_MEMORY != 0,
                (low & !0xf) | (u64::from(self.u32_at(off + 4)) << 32),
            ),
        };
        (enabled && base != 0 && base.checked_add(bar.size).is_some()).then_some(BarMapping {
            index,
            kind: bar.kind,
            base,
            size: bar.size,
        })
    }

    /// Place BAR `index` at `base` (what firmware would do), as a guest write would.
    pub fn set_bar_address(&mut self, index: usize, base: u64) {
        if self.bar(index).is_none() {
            return;
        }
        let off = BAR0 + 4 * index;
        self.write(off, &(base as u32).to_le_bytes());
        if matches!(
            self.bars[index].map(|b| b.kind),
            Some(BarKind::Mem64 { .. })
        ) {
            self.write(off + 4, &((base >> 32) as u32).to_le_bytes());
        }
    }
}

/// A configuration space's saved bytes do not fit this function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a saved PCI configuration space has {0} bytes, not {CONFIG_SIZE}")]
pub struct ConfigSizeError(pub usize);

impl PciConfig {
    /// The whole configuration space, for a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Takes the bits software may write (BAR addresses, the command register,
    /// capability controls…) from a snapshot; what the function fixed when it was built
    /// (IDs, capability layout, BAR sizes) stays as it is.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigSizeError> {
        if saved.len() != CONFIG_SIZE {
            return Err(ConfigSizeError(saved.len()));
        }
        for ((b, w), s) in self.bytes.iter_mut().zip(self.writable.iter()).zip(saved) {
            *b = (*b & !*w) | (*s & *w);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_00_00,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn write_u32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn header_fields_are_read_only_where_the_spec_says() {
        let mut c = PciConfig::new(ids());
        write_u32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(2), 0x0100_0001, "class and revision");
        write_u32(&mut c, COMMAND, 0xffff_ffff);
        assert_eq!(c.command(), 0x0547);
        assert_eq!(c.read_u32(1) >> 16, 0, "status is not writable");
        c.write(INTERRUPT_LINE, &[11]);
        c.set_interrupt_pin(1);
        assert_eq!(c.read_u32(15) & 0xffff, 0x010b);
        assert_eq!(c.read_u32(1024), u32::MAX);
        c.write(CONFIG_SIZE - 2, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_type_bits() {
        let cases = [
            (BarKind::Mem32, 0x4000u64, vec![0xffff_c000u32]),
            (BarKind::Io, 0x40, vec![0xffff_ffc1]),
            (
                BarKind::Mem64 { prefetchable: true },
                0x2_0000_0000,
                vec![0x0000_000c, 0xffff_fffe],
            ),
            (
                BarKind::Mem64 {
                    prefetchable: false,
                },
                0x10_0000,
                vec![0xfff0_0004, 0xffff_ffff],
            ),
        ];
        for (kind, size, want) in cases {
            let mut c = PciConfig::new(ids());
            c.add_bar(2, kind, size).unwrap();
            for (i, w) in want.iter().enumerate() {
                write_u32(&mut c, BAR0 + 8 + 4 * i, 0xffff_ffff);
                assert_eq!(c.read_u32(6 + i), *w, "{kind:?} dword {i}");
            }
        }
    }

    #[test]
    fn a_bar_decodes_once_placed_and_enabled() {
        let mut c = PciConfig::new(ids());
        c.add_bar(0, BarKind::Mem32, 0x4000).unwrap();
        c.add_bar(
            2,
            BarKind::Mem64 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        c.set_bar_address(0, 0xc000_4000);
        c.set_bar_address(2, 0x8_0000_1000);
        assert_eq!(c.bar_mapping(0), None, "memory decoding is off");
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let m = c.bar_mapping(0).unwrap();
        assert_eq!((m.base, m.size), (0xc000_4000, 0x4000));
        assert_eq!(c.bar_mapping(2).unwrap().base, 0x8_0000_1000);
        // Address bits below the size are not writable.
        c.set_bar_address(0, 0xc000_4321);
        assert_eq!(c.bar_mapping(0).unwrap().base, 0xc000_4000);
        assert_eq!(c.bar_mapping(1), None);
        assert_eq!(c.bar_mapping(7), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfig::new(ids());
        assert_eq!(
            c.add_bar(0, BarKind::Mem32, 0x3000),
            Err(ConfigError::BarSize(0x3000))
        );
        assert_eq!(
            c.add_bar(0, BarKind::Mem32, 8),
            Err(ConfigError::BarSize(8))
        );
        let wide = BarKind::Mem64 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(5, wide, 0x1000), Err(ConfigError::BarIndex(5)));
        c.add_bar(1, BarKind::Mem32, 0x1000).unwrap();
        assert_eq!(c.add_bar(0, wide, 0x1000), Err(ConfigError::BarIndex(0)));
        assert_eq!(c.add_bar(9, BarKind::Io, 4), Err(ConfigError::BarIndex(9)));
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut c = PciConfig::new(ids());
        let a = c.add_capability(0x09, &[14, 1, 0, 0, 0], &[]).unwrap();
        let b = c.add_capability(0x11, &[0x03, 0x00], &[0, 0xc0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.read_u32(1) >> 16 & u32::from(STATUS_CAP_LIST), 0x10);
        assert_eq!(c.read_u32(CAPABILITIES_POINTER / 4) & 0xff, 0x40);
        assert_eq!(c.read_u32(0x40 / 4) & 0xffff, 0x4809);
        assert_eq!(c.read_u32(0x48 / 4), 0x0003_0011);
        c.write(0x4a, &[0xff, 0xff]);
        assert_eq!(c.read_u32(0x48 / 4), 0xc003_0011);
        let big = vec![0u8; 250];
        assert!(c.add_capability(0x09, &big, &[]).is_err());
    }
}
