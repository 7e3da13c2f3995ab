//! Test doubles shared by the device unit tests.

use std::sync::Mutex;

use hypervisor::IrqChip;

/// An interrupt controller that records every line change, in order.
#[derive(Default)]
pub(crate) struct Lines(pub(crate) Mutex<Vec<(u32, bool)>>);

impl IrqChip for Lines {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        self.0.lock().unwrap().push((gsi, active));
        Ok(())
    }
    fn signal_msi(&self, _: u64, _: u32) -> hypervisor::Result<()> {
        Ok(())
    }
}
