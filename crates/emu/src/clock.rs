//! VM time: one epoch for every vCPU's TSC, the LAPIC timers, the PIT and kvmclock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::kvmclock::Scale;

/// The TSC rate the emu accelerator advertises (x86emu counts TSC ticks in host ns).
pub const TSC_HZ: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct VmClock {
    epoch: Instant,
    boot_unix_ns: u128,
}

impl Default for VmClock {
    fn default() -> Self {
        Self::new()
    }
}

impl VmClock {
    pub fn new() -> Self {
        VmClock {
            epoch: Instant::now(),
            boot_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        }
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Nanoseconds since the VM started.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The TSC and the matching VM time, read together.
    pub fn tsc_and_ns(&self) -> (u64, u64) {
        let ns = self.now_ns();
        (ns * (TSC_HZ / 1_000_000_000), ns)
    }

    pub fn scale(&self) -> Scale {
        Scale::for_tsc_hz(TSC_HZ)
    }

    pub fn boot_unix_ns(&self) -> u128 {
        self.boot_unix_ns
    }

    pub fn boot_unix_seconds(&self) -> i64 {
        (self.boot_unix_ns / 1_000_000_000) as i64
    }
}
