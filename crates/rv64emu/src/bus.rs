//! How devices reach the CPU: physical accesses outside RAM and the interrupt lines a
//! platform drives (the PLIC's external interrupt outputs).

/// Device side of the CPU. The VMM implements it.
pub trait Bus {
    /// A read of `size` bytes (1, 2, 4 or 8) from physical `pa` that is not RAM. None
    /// raises an access fault in the guest.
    fn read(&mut self, pa: u64, size: u8) -> Option<u64>;
    /// A write that is not RAM; false raises an access fault.
    fn write(&mut self, pa: u64, size: u8, value: u64) -> bool;
    /// The external-interrupt bits of `mip` this platform asserts for the hart
    /// (MEIP, bit 11, and SEIP, bit 9).
    fn external_pending(&mut self) -> u64 {
        0
    }
    /// Polled after each device access: true ends `Cpu::run` with `RunExit::Stop`.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// A bus with nothing on it: every access outside RAM faults.
#[derive(Debug, Default)]
pub struct NoDevices;

impl Bus for NoDevices {
    fn read(&mut self, _pa: u64, _size: u8) -> Option<u64> {
        None
    }
    fn write(&mut self, _pa: u64, _size: u8, _value: u64) -> bool {
        false
    }
}
