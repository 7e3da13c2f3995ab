//! The `emu` accelerator: Vessel's software x86-64 CPU (`x86emu`) and the user-space
//! interrupt controllers (`devices::irqchip`) behind the `hypervisor` traits.

pub mod convert;
pub mod kvmclock;
