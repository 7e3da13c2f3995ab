//! The two chipset functions of QEMU's q35 machine that UEFI firmware insists on: the
//! MCH host bridge (00:00.0, 8086:29c0) and the ICH9 LPC bridge (00:1f.0, 8086:2918).
//!
//! OVMF decides what machine it runs on from the host bridge's device ID alone and stops
//! on one it does not know; on q35 it then programs chipset registers: the MCH's
//! PCIEXBAR (where ECAM goes), the LPC's PMBASE and ACPI enable (where its ACPI timer
//! ticks, which all its delays count), PIRQ routing and the root complex base. It reads
//! them back (the timer's port is PMBASE + 8), so they must hold what it wrote; nothing
//! here acts on them: the VMM places ECAM and the timer where OVMF's q35 build puts them.
//! The LPC bridge is also how OVMF finds the serial port it makes its console.

use super::config::{PciConfig, PciIds};
use super::PciDevice;

pub const INTEL_VENDOR: u16 = 0x8086;
/// Q35's MCH and ICH9's LPC interface.
pub const MCH_DEVICE: u16 = 0x29c0;
pub const LPC_DEVICE: u16 = 0x2918;
/// The LPC bridge's slot (function 0 of device 31, as on every ICH).
pub const LPC_SLOT: usize = 31;
/// Class codes: host bridge; ISA bridge, the LPC interface's.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
const CLASS_ISA_BRIDGE: u32 = 0x06_01_00;
/// Chipset registers live after the standard header, up to the end of the legacy space.
const CHIPSET_REGS: std::ops::Range<usize> = 0x40..0x100;

/// Where OVMF's q35 build puts ECAM (its PcdPciExpressBaseAddress, written to the MCH's
/// PCIEXBAR) and how much it reserves for it (256 buses).
pub const ECAM_BASE: u64 = 0xb000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// The ACPI PM I/O block OVMF programs into the LPC's PMBASE, and its timer in there.
pub const PM_BASE: u16 = 0x600;
pub const PM_TIMER_PORT: u16 = PM_BASE + 8;

/// A chipset function: its IDs and a block of registers firmware writes and reads back.
#[derive(Debug)]
pub struct ChipsetFunction {
    config: PciConfig,
}

impl ChipsetFunction {
    fn new(device: u16, class: u32) -> Self {
        let mut config = PciConfig::new(PciIds {
            vendor: INTEL_VENDOR,
            device,
            class,
            revision: 2,
            // QEMU's subsystem IDs, which firmware built for QEMU looks for.
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        config.set_writable(
            CHIPSET_REGS.start,
            &[0xff; CHIPSET_REGS.end - CHIPSET_REGS.start],
        );
        ChipsetFunction { config }
    }

    /// The q35 MCH, the host bridge.
    pub fn mch() -> Self {
        Self::new(MCH_DEVICE, CLASS_HOST_BRIDGE)
    }

    /// ICH9's LPC interface, an ISA bridge.
    pub fn lpc() -> Self {
        Self::new(LPC_DEVICE, CLASS_ISA_BRIDGE)
    }

    /// The configuration space, for a snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        self.config.snapshot()
    }

    /// Takes what firmware wrote from a snapshot's configuration space (the IDs stay).
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), super::config::ConfigSizeError> {
        self.config.restore(saved)
    }
}

impl PciDevice for ChipsetFunction {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_reads_back_the_chipset_registers_it_wrote() {
        let mut lpc = ChipsetFunction::lpc();
        assert_eq!(lpc.config().read_u32(0), 0x2918_8086);
        assert_eq!(lpc.config().read_u32(2) >> 8, CLASS_ISA_BRIDGE);
        // PMBASE and ACPI_CNTL.
        lpc.write_config(0x40, &u32::from(PM_BASE).to_le_bytes());
        lpc.write_config(0x44, &[0x80]);
        assert_eq!(lpc.config().read_u32(0x40 / 4), u32::from(PM_BASE));
        assert_eq!(lpc.config().read_u32(0x44 / 4) & 0xff, 0x80);
        // The IDs stay what they are.
        lpc.write_config(0, &[0; 4]);
        assert_eq!(lpc.config().read_u32(0), 0x2918_8086);

        let mut mch = ChipsetFunction::mch();
        assert_eq!(mch.config().read_u32(0), 0x29c0_8086);
        mch.write_config(0x60, &((ECAM_BASE as u32) | 1).to_le_bytes());
        assert_eq!(mch.config().read_u32(0x60 / 4), ECAM_BASE as u32 | 1);

        // A snapshot carries what firmware wrote, not another function's IDs.
        let mut again = ChipsetFunction::lpc();
        again.restore(&lpc.snapshot()).unwrap();
        assert_eq!(again.config().read_u32(0x40 / 4), u32::from(PM_BASE));
        let mut other = ChipsetFunction::lpc();
        other.restore(&mch.snapshot()).unwrap();
        assert_eq!(other.config().read_u32(0), 0x2918_8086);
        assert!(other.restore(&[0; 16]).is_err());
    }
}
