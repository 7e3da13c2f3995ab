//! The guest-physical map of the `virt`-like machine (QEMU's `virt` addresses, so
//! firmware and kernels built for it find things where they expect).

pub const TEST_BASE: u64 = 0x10_0000;
pub const RTC_BASE: u64 = 0x10_1000;
pub const RTC_IRQ: u32 = 11;
pub const CLINT_BASE: u64 = 0x200_0000;
pub const PLIC_BASE: u64 = 0xc00_0000;
pub const UART_BASE: u64 = 0x1000_0000;
pub const UART_IRQ: u32 = 10;
pub const VIRTIO_BASE: u64 = 0x1000_1000;
pub const VIRTIO_STRIDE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 1;
pub const VIRTIO_SLOTS: u32 = 8;
pub const RAM_BASE: u64 = 0x8000_0000;
/// Harts the machine takes (QEMU `virt`'s per socket).
pub const MAX_HARTS: u32 = 8;
/// The `mtime` rate the device tree announces.
pub const TIMEBASE_HZ: u64 = 10_000_000;
/// The ISA the device tree announces; `misa` says the same.
pub const ISA: &str = "rv64imafdc_zicsr_zifencei";

/// SiFive test device commands (OpenSBI's reset driver and Linux's syscon use them).
pub const TEST_POWEROFF: u32 = 0x5555;
pub const TEST_RESET: u32 = 0x7777;
pub const TEST_FAIL: u32 = 0x3333;
