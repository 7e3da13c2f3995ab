//! kvmclock: the paravirtual clock Linux trusts instead of calibrating the TSC.
//!
//! The guest names a guest-physical page per vCPU through MSR_KVM_SYSTEM_TIME_NEW; the
//! host fills a `pvclock_vcpu_time_info` there: a TSC timestamp, the system time in ns at
//! that timestamp, and a fixed-point scale from TSC ticks to ns. With the TSC-stable flag
//! set, Linux reads time as `system_time + scale(rdtsc() - tsc_timestamp)` forever.

/// Writing the GPA (bit 0 = enable) of the vCPU's time info structure.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Writing the GPA of the wall-clock structure fills it once.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// The legacy MSR numbers, same meaning.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;

/// CPUID 0x40000001 EAX feature bits.
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// Offset of `flags` in pvclock_vcpu_time_info.
pub const PVCLOCK_FLAGS_OFFSET: u64 = 29;
/// pvclock flags: the host paused the guest (the guest clears it once its watchdogs know).
pub const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;
/// pvclock flags: the TSC is synchronized and constant across vCPUs.
const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;

/// The TSC-to-ns scale as pvclock encodes it: ns = ((ticks << shift) * mul) >> 32
/// (a negative shift shifts right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub mul: u32,
    pub shift: i8,
}

impl Scale {
    /// The scale for a TSC running at `tsc_hz`.
    pub fn for_tsc_hz(tsc_hz: u64) -> Scale {
        const NS_PER_S: u64 = 1_000_000_000;
        let mut shift: i8 = 0;
        let mut base = tsc_hz.max(1);
        // Bring the tick rate into (NS_PER_S / 2, NS_PER_S] so mul = NS_PER_S/base * 2^32
        // fits 32 bits.
        while base > NS_PER_S * 2 {
            base >>= 1;
            shift -= 1;
        }
        while base <= NS_PER_S {
            base <<= 1;
            shift += 1;
        }
        let mul = ((NS_PER_S << 32) / base) as u32;
        Scale { mul, shift }
    }

    /// Ticks to ns, as the guest computes it.
    pub fn apply(&self, ticks: u64) -> u64 {
        let t = if self.shift >= 0 {
            ticks << self.shift
        } else {
            ticks >> (-self.shift)
        };
        ((u128::from(t) * u128::from(self.mul)) >> 32) as u64
    }
}

/// The 32-byte `pvclock_vcpu_time_info` for one update.
pub fn vcpu_time_info(version: u32, tsc: u64, system_ns: u64, scale: Scale) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[8..16].copy_from_slice(&tsc.to_le_bytes());
    b[16..24].copy_from_slice(&system_ns.to_le_bytes());
    b[24..28].copy_from_slice(&scale.mul.to_le_bytes());
    b[28] = scale.shift as u8;
    b[PVCLOCK_FLAGS_OFFSET as usize] = PVCLOCK_TSC_STABLE_BIT;
    b
}

/// The 12-byte `pvclock_wall_clock`: the wall-clock time at system time zero.
pub fn wall_clock(version: u32, boot_unix_ns: u128) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[4..8].copy_from_slice(&((boot_unix_ns / 1_000_000_000) as u32).to_le_bytes());
    b[8..12].copy_from_slice(&((boot_unix_ns % 1_000_000_000) as u32).to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_convert_ticks_to_ns() {
        for hz in [
            1_000_000_000u64,
            2_500_000_000,
            3_000_000_000,
            100_000_000,
            1_193_182,
        ] {
            let s = Scale::for_tsc_hz(hz);
            let ns = s.apply(hz); // one second of ticks
            let err = ns.abs_diff(1_000_000_000);
            assert!(err < 10, "{hz} Hz: {ns} ns ({s:?})");
        }
        assert_eq!(Scale::for_tsc_hz(1_000_000_000).apply(12345), 12345);
    }

    #[test]
    fn time_info_layout() {
        let s = Scale::for_tsc_hz(1_000_000_000);
        let b = vcpu_time_info(2, 0x1122, 0x3344, s);
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x1122);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x3344);
        assert_eq!(b[29], 1);
    }
}
