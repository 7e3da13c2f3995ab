//! rv64emu: a software RV64 CPU (IMAC, Zicsr, Zifencei; M/S/U privilege; Sv39/Sv48).
//!
//! The CPU decodes each instruction once into an [`decode::Insn`] and caches decoded
//! blocks by physical address; addresses go through a soft TLB over the RISC-V page
//! tables. RAM is given as host memory ranges ([`GuestRam`], the same shape the x86 CPU
//! takes); everything else is a call into the VMM through [`Bus`].

pub mod bus;
mod cache;
pub mod clint;
pub mod cpu;
pub mod csr;
pub mod decode;
mod exec;
mod fpu;
mod jit;
pub mod mmu;
pub mod ram;
pub mod trap;
pub mod virt;

pub use bus::{Bus, NoDevices};
pub use cpu::{Cpu, Priv, RunExit, TimeSource};
pub use ram::{GuestRam, RamError};
pub use trap::{Exception, Interrupt};

// vCPUs run on their own threads: the CPU must be movable to one.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Cpu>();
};
