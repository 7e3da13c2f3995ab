//! User-space interrupt and timer controllers for the software CPU (`emu`).
//!
//! With KVM the LAPIC, IOAPIC, PIC and PIT live in the host kernel; with `emu` they live
//! here. Each device is a plain register-level model that knows nothing of any VMM, and
//! takes the time as `now_ns` (nanoseconds since VM start) from its caller:
//! - [`lapic::Lapic`]: one local APIC per vCPU (xAPIC MMIO, x2APIC MSRs, timer, IPIs);
//! - [`ioapic::IoApic`]: the 82093AA I/O APIC, 24 pins;
//! - [`pic::Pic`]: the 8259A master/slave pair with ELCR;
//! - [`pit::Pit`]: the 8254 interval timer and port 0x61;
//! - [`rtc::Rtc`]: the MC146818 CMOS real-time clock;
//! - [`chip::UserIrqChip`]: the router that ties them together behind one mutex and
//!   implements `hypervisor::IrqChip`.

pub mod chip;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod rtc;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::bus::BusDevice;

pub use chip::{ChipStateError, StartupEvent, UserIrqChip, UserIrqChipState};

/// How an interrupt message is delivered (ICR, redirection entry and MSI data bits 8–10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    /// Decode the 3-bit delivery-mode field; 0b011 is reserved.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 7 {
            0 => Some(DeliveryMode::Fixed),
            1 => Some(DeliveryMode::LowestPriority),
            2 => Some(DeliveryMode::Smi),
            4 => Some(DeliveryMode::Nmi),
            5 => Some(DeliveryMode::Init),
            6 => Some(DeliveryMode::StartUp),
            7 => Some(DeliveryMode::ExtInt),
            _ => None,
        }
    }
}

/// Trigger mode of an interrupt message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}

/// Who an interrupt message is for.
///
/// Physical `u32::MAX` is a broadcast in every APIC mode; physical 0xff is a broadcast to
/// xAPIC-mode LAPICs (the 8-bit broadcast of the IOAPIC, MSIs and the xAPIC ICR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// APIC ID.
    Physical(u32),
    /// Logical destination: flat/cluster (xAPIC, 8 bits) or x2APIC cluster (32 bits).
    Logical(u32),
    /// ICR shorthand 01: the sender only.
    SelfOnly,
    /// ICR shorthand 10: every LAPIC, the sender included.
    AllIncludingSelf,
    /// ICR shorthand 11: every LAPIC but the sender.
    AllExcludingSelf,
}

/// An inter-processor interrupt sent by a write to the ICR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub dest: Destination,
    pub vector: u8,
    pub mode: DeliveryMode,
    /// ICR bit 14: assert (true) or de-assert (only meaningful for level-triggered INIT).
    pub level: bool,
    pub trigger: Trigger,
}

/// An interrupt message from the IOAPIC or an MSI, on its way to the LAPICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub dest: Destination,
    pub vector: u8,
    pub mode: DeliveryMode,
    pub trigger: Trigger,
}

/// A source of "now" for devices reached through a bus, whose accesses carry no time.
pub trait Clock: Send + Sync {
    /// Nanoseconds since VM start.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, counted from when this value was created.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A port-I/O device whose registers depend on the time (the PIT, the RTC).
/// `offset` is from the base of its port range.
pub trait TimedPio: Send {
    fn pio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64);
    fn pio_write(&mut self, offset: u64, data: &[u8], now_ns: u64);
}

/// A [`TimedPio`] device paired with a [`Clock`], so it can sit on a [`crate::Bus`].
pub struct Clocked<D> {
    device: Arc<Mutex<D>>,
    clock: Arc<dyn Clock>,
}

impl<D> Clocked<D> {
    pub fn new(device: Arc<Mutex<D>>, clock: Arc<dyn Clock>) -> Self {
        Clocked { device, clock }
    }
}

impl<D: TimedPio> BusDevice for Clocked<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut d = self.device.lock().unwrap_or_else(|p| p.into_inner());
        d.pio_read(offset, data, now);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        let mut d = self.device.lock().unwrap_or_else(|p| p.into_inner());
        d.pio_write(offset, data, now);
    }
}

/// Nanoseconds per second, for tick/ns conversions.
pub(crate) const NS_PER_SEC: u128 = 1_000_000_000;

/// `ticks` of a `hz` clock, in nanoseconds, rounded up; saturates.
pub(crate) fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    let hz = u128::from(hz.max(1));
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(hz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Whole ticks of a `hz` clock in `ns` nanoseconds; saturates.
pub(crate) fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    let ticks = u128::from(ns) * u128::from(hz) / NS_PER_SEC;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// The first byte of a port write, if any.
pub(crate) fn first_byte(data: &[u8]) -> Option<u8> {
    data.first().copied()
}

/// Fill a port read: `value` in the first byte, zeros after.
pub(crate) fn fill_byte(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = value;
    }
}
