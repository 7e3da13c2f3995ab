//! The VMM's side of the accelerator seam's I/O path: port and MMIO buses, and the PCI
//! root bus for the addresses its BARs decode.

use std::sync::Arc;

use devices::pci::PciRoot;
use devices::Bus;
use hypervisor::IoHandler;

/// Both buses, as every vCPU of a VM sees them.
#[derive(Debug, Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
    /// Accesses neither bus claims go to the PCI BARs that decode them, if any.
    pub pci: Option<Arc<PciRoot>>,
}

impl IoHandler for IoBuses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pio.read(u64::from(port), data) {
            return;
        }
        if let Some(pci) = &self.pci {
            if pci.pio_read(u64::from(port), data) {
                return;
            }
        }
        // Nothing decodes the port: an ISA bus floats high.
        data.fill(0xff);
        tracing::trace!(port, "read from unmapped port");
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if self.pio.write(u64::from(port), data) {
            return;
        }
        if let Some(pci) = &self.pci {
            if pci.pio_write(u64::from(port), data) {
                return;
            }
        }
        tracing::trace!(port, ?data, "write to unmapped port");
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.mmio.read(addr, data) {
            return;
        }
        if let Some(pci) = &self.pci {
            if pci.mmio_read(addr, data) {
                return;
            }
        }
        data.fill(0xff);
        tracing::debug!(addr, "read from unmapped MMIO");
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.mmio.write(addr, data) {
            return;
        }
        if let Some(pci) = &self.pci {
            if pci.mmio_write(addr, data) {
                return;
            }
        }
        tracing::debug!(addr, ?data, "write to unmapped MMIO");
    }
}
