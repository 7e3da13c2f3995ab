//! x86emu: a software x86-64 CPU, Vessel's answer to QEMU TCG.
//!
//! The CPU decodes with iced-x86 (cached per physical address), translates addresses with
//! a soft TLB over 4-level paging, and executes the 64-bit integer, system and SSE/SSE2
//! instruction set that a Linux kernel and static userland use. RAM is given as host
//! pointer ranges ([`GuestRam`]); devices are reached through [`Platform`].

pub mod code;
pub mod cpu;
pub mod cpuid;
mod decode;
mod decoded;
pub mod exceptions;
mod exec;
mod interrupts;
mod jit;
pub mod mmu;
pub mod msr;
pub mod persist;
pub mod platform;
pub mod ptwatch;
mod segments;
pub mod state;
pub mod testing;

pub use cpu::{Core, Cpu, RunExit, PAUSE_SPIN};
pub use cpuid::{CpuidEntry, CpuidTable};
pub use decode::DEFAULT_BLOCK_SLOTS;
pub use decoded::DecodedBlocks;
pub use exceptions::Fault;
pub use jit::shared::CodeCache;
pub use platform::{GuestRam, NoDevices, Platform, RamError};
pub use state::{CpuState, DescriptorTable, FpuState, Msrs, Seg, Segment};

// vCPUs run on their own threads: the CPU must be movable to one.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Cpu>();
};
