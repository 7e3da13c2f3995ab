//! The Goldfish RTC, as QEMU's `virt` has it: nanoseconds since the Unix epoch in two
//! 32-bit halves, one alarm and its interrupt. Linux's `rtc-goldfish` reads it at boot
//! (`CONFIG_RTC_HCTOSYS`), so the guest's `date` starts at the host's time.
//!
//! The clock is the host's wall clock plus an offset the guest sets by writing the
//! time (`hwclock --systohc`): the host's clock is never changed.

use std::time::{SystemTime, UNIX_EPOCH};

/// Register offsets (Linux's drivers/rtc/rtc-goldfish.c names them).
const TIME_LOW: u64 = 0x00;
const TIME_HIGH: u64 = 0x04;
const ALARM_LOW: u64 = 0x08;
const ALARM_HIGH: u64 = 0x0c;
const IRQ_ENABLED: u64 = 0x10;
const CLEAR_ALARM: u64 = 0x14;
const ALARM_STATUS: u64 = 0x18;
const CLEAR_INTERRUPT: u64 = 0x1c;

/// The size of its register window.
pub const SIZE: u64 = 0x1000;

/// The host's wall clock in nanoseconds since the epoch (0 before it).
pub fn host_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The device's registers. Time comes in as an argument so tests drive it.
#[derive(Debug, Default)]
pub struct GoldfishRtc {
    /// Added to the host's clock: what the guest set minus what the host had then.
    offset: i64,
    /// TIME_HIGH as latched by the last TIME_LOW read, so a 64-bit read of two halves
    /// is consistent.
    high_latch: u32,
    alarm_high: u32,
    /// The armed alarm, in guest time.
    alarm: Option<u64>,
    irq_enabled: bool,
    /// The interrupt line's level.
    irq: bool,
}

impl GoldfishRtc {
    pub fn new() -> Self {
        Self::default()
    }

    fn guest_ns(&self, host_ns: u64) -> u64 {
        host_ns.wrapping_add_signed(self.offset)
    }

    /// A 32-bit register read at `host_ns`.
    pub fn read(&mut self, off: u64, host_ns: u64) -> u32 {
        match off {
            TIME_LOW => {
                let now = self.guest_ns(host_ns);
                self.high_latch = (now >> 32) as u32;
                now as u32
            }
            TIME_HIGH => self.high_latch,
            ALARM_LOW => self.alarm.map_or(0, |a| a as u32),
            ALARM_HIGH => self.alarm_high,
            IRQ_ENABLED => self.irq_enabled as u32,
            ALARM_STATUS => self.alarm.is_some() as u32,
            _ => 0,
        }
    }

    /// A 32-bit register write at `host_ns`.
    pub fn write(&mut self, off: u64, value: u32, host_ns: u64) {
        match off {
            // Setting the time moves one half of the guest's clock, the other kept.
            TIME_LOW | TIME_HIGH => {
                let now = self.guest_ns(host_ns);
                let set = if off == TIME_LOW {
                    (now & !0xffff_ffff) | value as u64
                } else {
                    (now & 0xffff_ffff) | ((value as u64) << 32)
                };
                self.offset = self.offset.wrapping_add(set.wrapping_sub(now) as i64);
            }
            ALARM_HIGH => self.alarm_high = value,
            // The low half arms the alarm (the driver writes the high half first).
            ALARM_LOW => {
                self.alarm = Some(((self.alarm_high as u64) << 32) | value as u64);
                self.poll(host_ns);
            }
            IRQ_ENABLED => {
                self.irq_enabled = value & 1 != 0;
                self.poll(host_ns);
            }
            CLEAR_ALARM => self.alarm = None,
            CLEAR_INTERRUPT => self.irq = false,
            _ => {}
        }
    }

    /// Fires a due alarm: disarms it and, when enabled, raises the line. Returns the
    /// line's level.
    pub fn poll(&mut self, host_ns: u64) -> bool {
        if let Some(at) = self.alarm {
            if self.guest_ns(host_ns) >= at {
                self.alarm = None;
                if self.irq_enabled {
                    self.irq = true;
                }
            }
        }
        self.irq
    }

    pub fn irq(&self) -> bool {
        self.irq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read64(r: &mut GoldfishRtc, t: u64) -> u64 {
        let lo = r.read(TIME_LOW, t) as u64;
        lo | ((r.read(TIME_HIGH, t + 5) as u64) << 32)
    }

    #[test]
    fn reads_the_host_time_with_a_latched_high_half() {
        let mut r = GoldfishRtc::new();
        let t = 0x1234_5678_ffff_fff0;
        assert_eq!(read64(&mut r, t), t);
        // The low half wraps between the two reads: the high half is the latched one.
        let lo = r.read(TIME_LOW, t);
        let hi = r.read(TIME_HIGH, t + 0x100);
        assert_eq!(((hi as u64) << 32) | lo as u64, t);
    }

    #[test]
    fn setting_the_time_offsets_the_host_clock() {
        let mut r = GoldfishRtc::new();
        let host = 1_000_000_000_000u64;
        let want = 1_700_000_000_000_000_000u64;
        r.write(TIME_HIGH, (want >> 32) as u32, host);
        r.write(TIME_LOW, want as u32, host);
        assert_eq!(read64(&mut r, host), want);
        assert_eq!(read64(&mut r, host + 7), want + 7, "the set clock runs on");
    }

    #[test]
    fn an_alarm_fires_once_enabled_and_clears() {
        let mut r = GoldfishRtc::new();
        let at = 5_000u64;
        r.write(ALARM_HIGH, 0, 0);
        r.write(ALARM_LOW, at as u32, 0);
        assert_eq!(r.read(ALARM_STATUS, 0), 1);
        assert!(!r.poll(4_999));
        // Due while disabled: disarmed without an interrupt.
        assert!(!r.poll(5_000));
        assert_eq!(r.read(ALARM_STATUS, 0), 0);
        r.write(IRQ_ENABLED, 1, 5_000);
        r.write(ALARM_LOW, 6_000, 5_000);
        assert!(r.poll(6_000));
        assert!(r.irq());
        r.write(CLEAR_INTERRUPT, 1, 6_000);
        assert!(!r.irq());
        // An alarm in the past fires as it is armed; CLEAR_ALARM disarms one pending.
        r.write(ALARM_LOW, 10, 6_000);
        assert!(r.irq());
        r.write(CLEAR_INTERRUPT, 1, 6_000);
        r.write(ALARM_LOW, 9_000, 6_000);
        r.write(CLEAR_ALARM, 1, 6_000);
        assert!(!r.poll(10_000));
    }
}
