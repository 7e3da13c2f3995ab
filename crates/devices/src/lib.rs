//! Device models: the I/O buses and the legacy PC devices a VM needs.
//!
//! Devices know nothing of the accelerator: accesses arrive through [`bus::Bus`], and
//! interrupts leave through `hypervisor::IrqChip`.

pub mod bus;
pub mod exit;
pub mod fw_cfg;
pub mod ged;
pub mod gpe;
pub mod irqchip;
pub mod legacy;
pub mod pci;
pub mod pflash;
pub mod serial;
#[cfg(test)]
pub(crate) mod testing;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitReason, ExitSignal};
