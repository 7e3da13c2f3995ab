//! Port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A device is inserted at a range; an access anywhere inside it reaches the device with
//! the offset from the range start. Overlaps are refused with both ranges in the error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. Accesses arrive with the offset inside the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A half-open address range [base, base + len).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }
    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

impl std::fmt::Display for BusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.base, self.end())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {new} overlaps {existing}")]
    Overlap { new: BusRange, existing: BusRange },
    #[error("empty range at {0:#x}")]
    EmptyRange(u64),
}

type Entry = (BusRange, Arc<Mutex<dyn BusDevice>>);

/// A bus: a sorted map from range start to device.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.values().map(|(r, _)| r))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let new = BusRange { base, len };
        // Only the neighbours can overlap: the last range starting at or before `base` and
        // the first one starting after it.
        let before = self.devices.range(..=base).next_back();
        let after = self.devices.range(base..).next();
        for (_, (existing, _)) in before.into_iter().chain(after) {
            if existing.overlaps(&new) {
                return Err(BusError::Overlap {
                    new,
                    existing: *existing,
                });
            }
        }
        self.devices.insert(base, (new, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (_, (range, dev)) = self.devices.range(..=addr).next_back()?;
        (addr < range.end()).then(|| (addr - range.base, dev))
    }

    /// Read from the device at `addr`; false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                // A device that panicked while holding its lock is still the device.
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Write to the device at `addr`; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev(v: u8) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn overlap_table() {
        // (base, len, accepted) inserted after [0x10, 0x20) and [0x30, 0x40).
        let cases = [
            (0x00, 0x10, true),
            (0x00, 0x11, false),
            (0x1f, 0x01, false),
            (0x20, 0x10, true),
            (0x20, 0x11, false),
            (0x15, 0x02, false),
            (0x05, 0x40, false),
            (0x40, 0x01, true),
            (0x3f, 0x01, false),
        ];
        for (base, len, ok) in cases {
            let mut bus = Bus::new();
            bus.insert(dev(0), 0x10, 0x10).unwrap();
            bus.insert(dev(0), 0x30, 0x10).unwrap();
            let r = bus.insert(dev(0), base, len);
            assert_eq!(r.is_ok(), ok, "[{base:#x}, +{len:#x}): {r:?}");
            if let Err(BusError::Overlap { new, existing }) = r {
                assert_eq!(new, BusRange { base, len });
                assert!(existing.base == 0x10 || existing.base == 0x30);
            }
        }
        assert_eq!(
            Bus::new().insert(dev(0), 5, 0),
            Err(BusError::EmptyRange(5))
        );
    }

    #[test]
    fn dispatch_passes_offsets() {
        let mut bus = Bus::new();
        bus.insert(dev(0x40), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x42);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3f8, &[7]));
        bus.read(0x3f8, &mut b);
        assert_eq!(b[0], 7);
    }
}
