//! The VMM: builds a VM from a `VmConfig` and runs it.

pub mod accel;
pub mod api;
pub mod cloud_init;
pub mod config;
pub mod console;
pub mod control;
pub mod file_identity;
pub mod io;
pub mod migration;
pub mod riscv;
pub mod runtime;
pub mod snapshot;
pub mod vm;

pub use config::{Accel, CpuModel, SerialConfig, VmConfig};
pub use control::{ControlError, VmControl};
pub use devices::ExitReason;
pub use vm::{Vmm, VmmError};
