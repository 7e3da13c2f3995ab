//! VM time: one epoch for every vCPU's TSC, the LAPIC timers, the PIT and kvmclock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::kvmclock::Scale;

/// The TSC rate the emu accelerator advertises (x86emu counts TSC ticks in host ns).
pub const TSC_HZ: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct VmClock {
    epoch: Instant,
    /// Added to the time since `epoch`: a restored VM's clock goes on from its snapshot.
    offset_ns: AtomicU64,
    /// The host's wall-clock time at VM time 0 (kvmclock's wall clock); a restored VM
    /// keeps its original one.
    boot_unix_ns: AtomicU64,
    /// The TSC rate the guest is told (kvmclock's scale).
    tsc_hz: u64,
    /// The guest TSC is the host's RDTSC (the hybrid accelerator, where user code reads
    /// it natively), not nanoseconds since `epoch`.
    host_tsc: bool,
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
            offset_ns: AtomicU64::new(0),
            boot_unix_ns: AtomicU64::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                    .unwrap_or_default(),
            ),
            tsc_hz: TSC_HZ,
            host_tsc: false,
        }
    }

    /// A clock whose TSC is the host's RDTSC, running at `tsc_hz`.
    pub fn with_host_tsc(tsc_hz: u64) -> Self {
        VmClock {
            tsc_hz: tsc_hz.max(1),
            host_tsc: true,
            ..Self::new()
        }
    }

    /// The guest TSC's rate.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    pub fn host_tsc(&self) -> bool {
        self.host_tsc
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Nanoseconds since the VM started.
    pub fn now_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64)
            .wrapping_add(self.offset_ns.load(Ordering::Relaxed))
    }

    /// Sets the VM's time to `ns` now (a restored VM's clock goes on from there) and its
    /// wall-clock origin to `boot_unix_ns`. Set before any vCPU runs.
    pub fn resume_at(&self, ns: u64, boot_unix_ns: u64) {
        let since_epoch = self.epoch.elapsed().as_nanos() as u64;
        self.offset_ns
            .store(ns.wrapping_sub(since_epoch), Ordering::Relaxed);
        self.boot_unix_ns.store(boot_unix_ns, Ordering::Relaxed);
    }

    /// The TSC and the matching VM time, read together.
    pub fn tsc_and_ns(&self) -> (u64, u64) {
        if self.host_tsc {
            // SAFETY: RDTSC has no memory effects; every x86-64 host has it.
            let tsc = unsafe { std::arch::x86_64::_rdtsc() };
            return (tsc, self.now_ns());
        }
        let ns = self.now_ns();
        (ns * (TSC_HZ / 1_000_000_000), ns)
    }

    pub fn scale(&self) -> Scale {
        Scale::for_tsc_hz(self.tsc_hz)
    }

    pub fn boot_unix_ns(&self) -> u128 {
        u128::from(self.boot_unix_ns.load(Ordering::Relaxed))
    }

    pub fn boot_unix_seconds(&self) -> i64 {
        (self.boot_unix_ns() / 1_000_000_000) as i64
    }
}
