//! The ACPI general-purpose event block (GPE0) of a full ACPI platform, and the SCI it
//! drives.
//!
//! A full platform (the firmware-booted one, as QEMU's q35) signals events to the OS the
//! way real chipsets do: an event sets its bit in GPE0_STS; while any status bit is also
//! set in GPE0_EN, the SCI (a level-triggered interrupt the FADT names) is asserted. The
//! OS runs the DSDT's `\_GPE._Exx` method for the bit and clears the status by writing 1
//! to it, which drops the SCI. The block is 16 status bits then 16 enable bits.

use std::sync::Arc;

use hypervisor::IrqChip;

use crate::bus::BusDevice;

/// Ports the block takes: GPE0_STS (2 bytes) and GPE0_EN (2 bytes).
pub const GPE0_PORTS: u64 = 4;

pub struct Gpe0 {
    irq: Arc<dyn IrqChip>,
    sci_gsi: u32,
    /// GPE0_STS then GPE0_EN, little-endian.
    regs: [u8; 4],
    sci: bool,
}

impl std::fmt::Debug for Gpe0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpe0")
            .field("sts", &self.status())
            .field("en", &self.enabled())
            .field("sci", &self.sci)
            .finish()
    }
}

impl Gpe0 {
    pub fn new(irq: Arc<dyn IrqChip>, sci_gsi: u32) -> Self {
        Gpe0 {
            irq,
            sci_gsi,
            regs: [0; 4],
            sci: false,
        }
    }

    fn status(&self) -> u16 {
        u16::from_le_bytes([self.regs[0], self.regs[1]])
    }

    fn enabled(&self) -> u16 {
        u16::from_le_bytes([self.regs[2], self.regs[3]])
    }

    /// Sets event `bit`'s status (0..16); the SCI follows.
    pub fn raise(&mut self, bit: u8) -> Result<(), hypervisor::Error> {
        if bit < 16 {
            let sts = self.status() | (1 << bit);
            self.regs[..2].copy_from_slice(&sts.to_le_bytes());
        }
        self.update_sci()
    }

    /// GPE0_STS then GPE0_EN, for a snapshot.
    pub fn regs(&self) -> [u8; 4] {
        self.regs
    }

    /// Puts back what [`Gpe0::regs`] saved; the SCI follows.
    pub fn set_regs(&mut self, regs: [u8; 4]) -> Result<(), hypervisor::Error> {
        self.regs = regs;
        self.update_sci()
    }

    /// Whether the SCI is asserted now.
    pub fn sci(&self) -> bool {
        self.sci
    }

    fn update_sci(&mut self) -> Result<(), hypervisor::Error> {
        let level = self.status() & self.enabled() != 0;
        if level != self.sci {
            self.sci = level;
            self.irq.set_irq_line(self.sci_gsi, level)?;
        }
        Ok(())
    }
}

impl BusDevice for Gpe0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            match usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) {
                // Status: write 1 to clear.
                Some(at @ (0 | 1)) => self.regs[at] &= !v,
                Some(at @ (2 | 3)) => self.regs[at] = v,
                _ => {}
            }
        }
        if let Err(e) = self.update_sci() {
            tracing::warn!("GPE0: the SCI line: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Lines;

    #[test]
    fn an_enabled_event_holds_the_sci_until_the_os_clears_it() {
        let lines = Arc::new(Lines::default());
        let mut g = Gpe0::new(lines.clone(), 9);
        // Not enabled: the status shows, the SCI stays low.
        g.raise(0).unwrap();
        assert!(!g.sci());
        let mut sts = [0u8; 2];
        g.read(0, &mut sts);
        assert_eq!(sts, [1, 0]);
        // Enabling a pending event raises the SCI.
        g.write(2, &[1, 0]);
        assert!(g.sci());
        assert_eq!(*lines.0.lock().unwrap(), vec![(9, true)]);
        // Writing 0 leaves the status; writing 1 clears it and drops the line.
        g.write(0, &[0]);
        assert!(g.sci());
        g.write(0, &[1]);
        assert!(!g.sci());
        assert_eq!(*lines.0.lock().unwrap(), vec![(9, true), (9, false)]);
        // A raise while enabled asserts at once; a wide read sees both registers.
        g.raise(0).unwrap();
        assert!(g.sci());
        let mut all = [0u8; 4];
        g.read(0, &mut all);
        assert_eq!(all, [1, 0, 1, 0]);
        // Out of range: nothing happens, nothing panics.
        g.raise(40).unwrap();
        g.write(u64::MAX, &[0xff, 0xff]);
        g.read(u64::MAX, &mut all);
        assert_eq!(all, [0; 4]);
    }
}
